#!/usr/bin/env bash
# Every GPU benchmark docs/performance.md quotes, in one call on a GPU machine (at most 9 min 30 s):
#
#     bash bench/gpu_session.sh [OUT_DIR]         # default: $OUT when set, else gpu-session/
#     bash bench/gpu_session.sh --tiny OUT_DIR    # the same scripts on tiny models on the CPU: a check
#
# The steps run in order of what they are worth, each under its own time limit: the job path's table with
# its kernel profile (bench/gpu_job.py), the dense API (bench/gpu_importance.py), exactness against the
# torch backend (bench/gpu_check.py), a replica's host side with the real model (bench/actor_host.py).
# Each writes OUT_DIR/<step>.txt (and <step>.json where the script writes one); OUT_DIR/device.txt names
# the device and the versions, and OUT_DIR/summary.txt has a line per step. A step that fails or runs
# out of time says so there and the next one still runs; the exit status is the number of such steps.
# It needs python3 with torch, transformers, triton, numpy and pyarrow, which the GPU machines have (PYTHON
# names another interpreter), and nltk for the actor step, which they lack: `bash bench/gpu_wheels.sh`
# fetches its wheels into .whl/ beside bench/ (git ignores it; carry it to the GPU machine), and this
# script installs whatever .whl/ holds into a folder of its own, first on PYTHONPATH, never into the
# interpreter's environment (WHEELS names another folder). STEPS=job,check runs only the steps named.
set -u
tiny=""
if [ "${1:-}" = "--tiny" ]; then
    tiny=1
    shift
fi
case ${1:-} in
    -*) echo "gpu_session.sh: unknown option '$1'; expected [--tiny] [OUT_DIR], e.g. bash bench/gpu_session.sh --tiny out" >&2
        exit 2 ;;
esac
out=${1:-${OUT:-gpu-session}}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
wheels=${WHEELS:-$here/../.whl}
steps=${STEPS:-job,importance,check,actor}
for s in ${steps//,/ }; do
    case $s in
        job | importance | check | actor) ;;
        *) echo "gpu_session.sh: unknown step '$s' in STEPS; expected some of job,importance,check,actor" >&2
           exit 2 ;;
    esac
done
mkdir -p "$out" || exit 2
: >"$out/summary.txt"
export PYTHONUNBUFFERED=1
failed=0

step() {  # step NAME SECONDS SCRIPT [ARGS...]
    local name=$1 limit=$2 t0=$SECONDS rc why
    shift 2
    timeout --kill-after=10 "$limit" "$py" "$@" >"$out/$name.txt" 2>&1
    rc=$?
    case $rc in
        0) why="ok" ;;
        124 | 137) why="stopped at its limit of $limit s" ;;
        *) why="failed (exit $rc)" ;;
    esac
    [ "$rc" -ne 0 ] && failed=$((failed + 1))
    printf '%-10s %-32s %4d s  %s\n' "$name" "$why" $((SECONDS - t0)) "$out/$name.txt" | tee -a "$out/summary.txt"
}

want() {  # want NAME: the step is among STEPS
    case ",$steps," in *",$1,"*) return 0 ;; esac
    return 1
}

needs() {  # needs NAME MODULE: false, with the step counted as failed and why, when MODULE does not import
    "$py" -c "import $2" >/dev/null 2>&1 && return 0
    failed=$((failed + 1))
    printf '%-10s %-32s %4d s  %s\n' "$1" "failed (cannot import $2)" 0 \
        "fetch its wheels with bash bench/gpu_wheels.sh, then carry .whl" | tee -a "$out/summary.txt"
    return 1
}

if compgen -G "$wheels/*.whl" >/dev/null; then
    site=$(mktemp -d)
    if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl \
        >"$out/wheels.txt" 2>&1; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        echo "wheels installed for this session: $(cd "$wheels" && echo *.whl)" >>"$out/wheels.txt"
    else
        echo "installing the wheels of $wheels failed: the steps that need them will say so" >>"$out/wheels.txt"
    fi
    cat "$out/wheels.txt"
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$py" -c 'import sys, torch, transformers
print("python", sys.version.split()[0], "| torch", torch.__version__, "| transformers", transformers.__version__)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
for name in ("triton", "nltk"):
    try:
        print(name, __import__(name).__version__)
    except ImportError as exc:
        print("no", name + ":", exc)'
} >"$out/device.txt" 2>&1
cat "$out/device.txt"

if [ -n "$tiny" ]; then
    export TRITON_INTERPRET=1
    want job && step job 240 "$here/gpu_job.py" --tiny --repeats 1 --backends cpu,torch --json "$out/job.json"
    want importance && step importance 240 "$here/gpu_importance.py" --tiny --repeats 1 --backends cpu,torch \
        --json "$out/importance.json"
    want check && step check 240 "$here/gpu_check.py" --tiny --families llama-gqa
    want actor && needs actor nltk && step actor 240 "$here/actor_host.py" --tiny --device cpu
else
    want job && step job 360 "$here/gpu_job.py" --profile --tiles 16x32:64,16x64:32 --json "$out/job.json"
    want importance && step importance 60 "$here/gpu_importance.py" --long 0 --repeats 5 --backends triton \
        --json "$out/importance.json"
    want check && step check 45 "$here/gpu_check.py" --families llama-gqa,gemma2
    want actor && needs actor nltk && step actor 60 "$here/actor_host.py" --device cuda --cores 0 --texts 64 --repeats 1
fi
exit "$failed"
