"""The documentation runs as written.

Every ```python block of README.md and docs/*.md runs, in order, in one namespace per file, on the packaged
SmolLM2. Every command of the README's ```bash blocks runs too, from a scratch folder: ``flowray ...`` in
this process, anything else under bash; a ```yaml block whose first line is ``# NAME.yaml`` is written
there first, as a reader would save it. Both load SmolLM2 once for the whole session:
``load_model("smollm2")`` returns the shared copy (the same weights a fresh load gives).

Commands that take minutes at full size get test-scale settings (``_scaled``: fewer texts and prompts, a
tiny model for the comparison, two of the five notebooks), never a different meaning. A block fenced ```python not-run or
```bash not-run is skipped, and its first line must say why.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

FENCE = re.compile(r"^```([\w-]*)[ \t]*([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NOT_RUN = "not-run"


def blocks(path: Path, language: str) -> list[tuple[int, str, bool]]:
    """``(line, code, runs)`` of every fenced block of ``language`` in ``path``."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(3), NOT_RUN not in m.group(2).split())
            for m in FENCE.finditer(text) if m.group(1) == language]


def _files_with(language: str) -> list[Path]:
    return [p for p in DOCS if any(runs for _, _, runs in blocks(p, language))]


@pytest.fixture(scope="module")
def shared_smollm2(smollm2):
    """``load_model("smollm2")`` (what the examples and the CLI call) returns the session's loaded copy."""
    from flowray.models import loading

    real = loading.load_model

    def load_model(spec, *args, **kwargs):
        plain = (not args and kwargs.get("dtype", "float32") == "float32" and kwargs.get("device", "auto") in ("auto", "cpu")
                 and not kwargs.get("trust_remote_code") and set(kwargs) <= {"dtype", "device", "trust_remote_code"})
        return smollm2 if spec == "smollm2" and plain else real(spec, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loading, "load_model", load_model)
        yield smollm2


# --- Python -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", _files_with("python"), ids=lambda p: str(p.relative_to(REPO)))
def test_every_python_block_runs(path, shared_smollm2, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write route.json, route.png, ...
    namespace: dict = {"__name__": "__main__"}
    for line, code, runs in blocks(path, "python"):
        if runs:
            exec(compile(code, f"{path.name}:{line}", "exec"), namespace)  # noqa: S102 - the documented example


# --- the README's commands ----------------------------------------------------------------------------
def _scaled(argv: list[str], tiny_model_dir: Path) -> list[str]:
    """``argv`` (after ``flowray``) at test scale."""
    if argv[:2] == ["job", "run"]:
        return argv + ["--set", "texts_per_domain=2", "--set", "max_tokens=24"]
    if argv[:1] == ["compare"]:  # patching every head of SmolLM2 on 50 prompts takes minutes
        if "--n" in argv:
            argv = argv[:argv.index("--n")] + argv[argv.index("--n") + 2:]
        return argv + ["--n", "2", "--model", str(tiny_model_dir), "--ks", "1,2", "--random-draws", "1"]
    return argv


def _run_python_script(argv: list[str], cwd: Path) -> None:
    if argv[1:2] == ["analysis/run_all.py"]:  # five notebooks: two show that a run of one's own corpus works
        argv = argv + ["--only", "bottom_to_top", "domains"]
    script = REPO / argv[1]
    proc = subprocess.run([sys.executable, str(script), *argv[2:]], cwd=cwd, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, f"{shlex.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def _commands(code: str) -> list[str]:
    return [line for line in code.replace("\\\n", " ").splitlines() if shlex.split(line, comments=True)]


def _run(command: str, cwd: Path, tiny_model_dir: Path, capsys) -> None:
    from flowray.cli import main

    argv = shlex.split(command, comments=True)
    if argv[0] == "flowray":
        status = main(_scaled(argv[1:], tiny_model_dir))
        assert status == 0, f"{command}: exit status {status}\n{capsys.readouterr().err[-3000:]}"
    elif argv[0] == "python":
        _run_python_script(argv, cwd)
    else:
        subprocess.run(["bash", "-c", command], cwd=cwd, check=True, timeout=60)


def test_every_readme_command_runs(shared_smollm2, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    text = (REPO / "README.md").read_text()
    ran = 0
    try:
        for m in FENCE.finditer(text):
            language, info, code = m.group(1), m.group(2).split(), m.group(3)
            if NOT_RUN in info:
                continue
            if language == "yaml" and (name := re.match(r"# ([\w.-]+\.ya?ml)\n", code)):
                (tmp_path / name.group(1)).write_text(code)  # saved as the reader would
            if language == "bash":
                for command in _commands(code):
                    _run(command, tmp_path, tiny_model_dir, capsys)
                    ran += 1
    finally:
        import ray

        ray.shutdown()  # the job started an embedded Ray in this process
    assert ran >= 10


# --- the blocks themselves ------------------------------------------------------------------------------
@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_blocks_that_do_not_run_say_why(path):
    text = path.read_text()
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        if NOT_RUN in m.group(2).split():
            assert m.group(3).startswith("# not run by the tests: "), f"{path.name}:{line}: say why it does not run"
        assert m.group(1) in ("python", "bash", "yaml", "text"), f"{path.name}:{line}: ```{m.group(1)} is never run"
