"""The benchmark scripts run (on tiny inputs here; their numbers come from real runs, see the README)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_script_runs_its_code_path_on_a_tiny_model():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_importance.py"), "--tiny", "--repeats", "1",
                           "--tokens", "40", "--long", "96", "--backends", "cpu,torch"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# cpu; torch")
    assert lines[1].split() == ["what", "seconds", "vs", "forward", "peak", "GB"]
    rows = {" ".join(line.split()[:-3]): line.split()[-3:] for line in lines[2:6]}
    assert set(rows) == {"forward", "flowray cpu", "flowray torch", "host copy"}
    forward_s = float(rows["forward"][0])
    for what in ("flowray cpu", "flowray torch"):
        seconds, ratio = float(rows[what][0]), float(rows[what][1].rstrip("x"))
        assert seconds > 0
        # the ratio is the two columns of the same run divided, not a hand-made figure
        rounding = 5e-5 * (1 / forward_s + 1 / seconds) * ratio + 0.005  # the seconds are printed to 4 decimals
        assert ratio == pytest.approx(seconds / forward_s, abs=rounding)
    assert "# T=96 (cpu): fits" in proc.stdout, "the --long context asked for is the one checked"


def test_gpu_job_benchmark_runs_its_code_path_on_a_tiny_model(tmp_path):
    out = tmp_path / "job.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_job.py"), "--tiny", "--repeats", "1",
                           "--backends", "cpu,torch", "--profile", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    result = json.loads(out.read_text())
    whats = [r["what"] for r in result["table"]]
    assert whats == ["forward", "job cpu", "job torch", "job cpu, last", "EAP"]
    fwd = result["table"][0]["seconds"]
    for r in result["table"]:
        assert r["seconds"] > 0 and r["ratio"] == pytest.approx(fwd / r["seconds"])  # measured side by side
    assert [r["tokens"] for r in result["long"]] == [96, 128] and all(r["seconds"] > 0 for r in result["long"])
    table = proc.stdout[proc.stdout.index("shape "):]
    assert "job cpu" in table and "EAP" in table
    # --profile: the batch's phases in the order they ran, each timed on the host, nested in the whole call
    phases = {p["name"]: p for p in result["table"][1]["phases"]}
    assert list(phases) == ["call", "flowray.forward", "flowray.layer", "flowray.overflow", "flowray.routes",
                            "flowray.pruned", "flowray.finish"]
    assert phases["flowray.layer"]["calls"] == 2  # the tiny model's layers
    assert all(p["host_ms"] > 0 and p["device_busy_ms"] is None for p in phases.values())  # no device on the CPU
    assert phases["flowray.layer"]["host_ms"] < phases["flowray.forward"]["host_ms"] < phases["call"]["host_ms"]
    assert "# phases tiny job cpu: flowray.routes" in proc.stdout


def test_the_job_throughput_benchmark_runs_in_process_on_two_short_texts():
    """The worker, timed beside a plain forward pass of the same batches, writes one row per text token
    (its BOS processed, no row of its own): the bench checks that count on every repeat."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "job_throughput.py"), "--texts", "2", "--max-tokens",
                           "12", "--texts-per-shard", "2", "--batch-size", "2", "--repeats", "1", "--no-ray"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.splitlines()
    assert out[0].startswith("# 2 texts,") and "a BOS each" in out[0]
    fwd = next(line for line in out if line.startswith("plain forward pass"))
    job = next(line for line in out if line.startswith("worker, steady state"))
    assert float(fwd.split()[-2]) > 0 and float(job.split()[-2]) > 0  # tokens/s, both measured
    assert 0 < float(job.split()[-1].rstrip("x")) < 10


def _actor_host(*args, block=()) -> list[str]:
    """bench/actor_host.py's output lines; ``block``: top-level packages it must run without."""
    code = ("import importlib.abc, runpy, sys\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            f"        if name.split('.')[0] in {set(block)!r}:\n"
            "            raise ImportError('not on the GPU machines: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "bench" / "actor_host.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines()


def _rows(lines: list[str], busy_at_most: float = 100.0) -> dict:
    header = lines[1].split()
    assert header[:7] == ["mode", "dev_us", "pred/s", "busy", "run", "idle_us", "B/pred"] and header[-1] == "host_us"
    rows = {}
    for line in lines[2:]:
        if line.startswith("#"):
            break
        cells = dict(zip(header, line.split()))
        steps = [float(cells[k]) for k in header[7:-1]]
        assert all(v >= 0 for v in steps) and float(cells["pred/s"]) > 0 and float(cells["B/pred"]) > 0
        assert float(cells["host_us"]) == pytest.approx(sum(steps), abs=0.05 * len(steps))  # the printed steps' sum
        assert all(0 <= float(cells[k].rstrip("%")) <= busy_at_most for k in ("busy", "run"))
        rows[(cells["mode"], cells["dev_us"])] = cells
    return rows


def test_the_actor_host_benchmark_times_every_step_beside_a_stand_in_device():
    lines = _actor_host("--tiny", "--calls", "1,3")
    assert lines[0].startswith("# actor host: tiny shape (2 layers x 3 heads) on the simulated device")
    rows = _rows(lines)
    assert set(rows) == {(mode, us) for mode in ("overlap:1", "overlap:3", "serial") for us in ("0", "55")}
    assert float(rows[("overlap:3", "55")]["idle_us"]) >= 0 and float(rows[("overlap:3", "55")]["encode"]) > 0
    bad = subprocess.run([sys.executable, str(REPO / "bench" / "actor_host.py"), "--calls", "2,x"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert bad.returncode == 2 and "expected positive whole numbers separated by commas, e.g. 2,4; got '2,x'" \
        in bad.stderr and "Traceback" not in bad.stderr


def test_the_actor_host_benchmark_compares_parquet_layouts_of_the_same_rows():
    lines = _actor_host("--tiny", "--layouts")
    assert lines[0].split() == ["layout", "encode_us", "sha256_us", "B/pred", "encode/job"]
    rows = {line[:36].strip(): line[36:].split() for line in lines[1:] if not line.startswith("#")}
    assert len(rows) == 9 and rows["job: zstd; floats split, ids delta"][-1] == "1.00"
    assert all(float(v) > 0 for cells in rows.values() for v in (cells[0], cells[2], cells[3]))
    # the codecs compress: the job's layout is smaller than the same rows written plain and uncompressed
    assert float(rows["job: zstd; floats split, ids delta"][2]) < float(rows["uncompressed, plain"][2])


def test_the_actor_host_benchmark_runs_the_real_model_with_only_what_gpu_machines_have():
    lines = _actor_host("--tiny", "--device", "cpu", block=("polars", "ray", "datasets", "gguf", "matplotlib"))
    assert lines[0].startswith("# actor host: tiny shape (2 layers x 3 heads) on the CPU")
    # busy: the stage alone over the pipeline, two timings of a noisy machine (above 100% at times)
    assert set(_rows(lines, busy_at_most=float("inf"))) == {("overlap", "-"), ("serial", "-")}


def test_the_gpu_session_runs_every_gpu_benchmark_in_one_call(tmp_path):
    """bench/gpu_session.sh --tiny: the same four steps as on a GPU machine, each script's output in its
    file, a summary line per step; a step that fails is counted in the exit status and the rest still run."""
    import json
    import os

    (tmp_path / "no-wheels").mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no-wheels")}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_session.sh"), "--tiny", str(tmp_path / "ok")],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = (tmp_path / "ok" / "summary.txt").read_text().splitlines()
    assert [line.split()[:2] for line in summary] == [[step, "ok"] for step in ("job", "importance", "check", "actor")]
    assert "device: no CUDA device" in (tmp_path / "ok" / "device.txt").read_text()
    assert [r["what"] for r in json.loads((tmp_path / "ok" / "job.json").read_text())["table"]][:3] == \
        ["forward", "job cpu", "job torch"]
    assert (tmp_path / "ok" / "check.txt").read_text().rstrip().endswith("ALL OK")
    assert "# actor host: tiny shape" in (tmp_path / "ok" / "actor.txt").read_text()
    assert (tmp_path / "ok" / "importance.json").is_file()

    broken = subprocess.run(["bash", str(REPO / "bench" / "gpu_session.sh"), str(tmp_path / "bad")],
                            capture_output=True, text=True, timeout=120, env={**env, "PYTHON": "false"})
    assert broken.returncode == 4
    lines = (tmp_path / "bad" / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["job", "importance", "check", "actor"]
    assert all("failed (exit 1)" in line for line in lines[:3])
    assert "failed (cannot import nltk)" in lines[3] and "bash bench/gpu_wheels.sh" in lines[3]

    typo = subprocess.run(["bash", str(REPO / "bench" / "gpu_session.sh"), "--tinny"], capture_output=True, text=True,
                          timeout=60, env=env, cwd=tmp_path)
    assert typo.returncode == 2 and "unknown option '--tinny'; expected [--tiny] [OUT_DIR]" in typo.stderr
    assert not (tmp_path / "--tinny").exists() and not (tmp_path / "gpu-session").exists()
    unknown = subprocess.run(["bash", str(REPO / "bench" / "gpu_session.sh"), "--tiny", str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=60, env={**env, "STEPS": "job,actr"})
    assert unknown.returncode == 2 and "unknown step 'actr' in STEPS" in unknown.stderr


def _wheel(folder: Path, name: str, version: str, init: str) -> Path:
    """A minimal pure-Python wheel of one package ``name`` whose ``__init__.py`` is ``init``."""
    import zipfile

    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", init)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", f"{name}/__init__.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return path


def test_the_gpu_session_brings_the_packages_the_gpu_image_lacks_as_wheels(tmp_path):
    """The GPU machines' Python has no nltk: without it the actor step fails at once, saying how to bring
    it; wheels in WHEELS (bench/gpu_wheels.sh fetches them) are installed apart and come first on the path."""
    import os

    hidden = tmp_path / "hidden"  # an nltk that does not import stands for the image's missing one
    (hidden / "nltk").mkdir(parents=True)
    (hidden / "nltk" / "__init__.py").write_text("raise ImportError('not on this machine')\n")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "STEPS": "actor", "WHEELS": str(wheels),
           "PYTHONPATH": str(hidden)}
    script = str(REPO / "bench" / "gpu_session.sh")

    missing = subprocess.run(["bash", script, "--tiny", str(tmp_path / "missing")], capture_output=True, text=True,
                             timeout=120, env=env)
    assert missing.returncode == 1, missing.stdout + missing.stderr
    summary = (tmp_path / "missing" / "summary.txt").read_text().splitlines()
    assert len(summary) == 1 and summary[0].split()[:4] == ["actor", "failed", "(cannot", "import"]
    assert "fetch its wheels with bash bench/gpu_wheels.sh, then carry .whl" in summary[0]
    assert "no nltk: not on this machine" in (tmp_path / "missing" / "device.txt").read_text()
    assert not (tmp_path / "missing" / "actor.txt").exists()  # the step never started

    _wheel(wheels, "nltk", "0.0.1", "__version__ = '0.0.1'\n")  # imports, but has no tagger: the step fails
    brought = subprocess.run(["bash", script, "--tiny", str(tmp_path / "brought")], capture_output=True, text=True,
                             timeout=300, env=env)
    assert brought.returncode == 1, brought.stdout + brought.stderr
    assert "wheels installed for this session: nltk-0.0.1-py3-none-any.whl" in brought.stdout
    assert "nltk 0.0.1" in (tmp_path / "brought" / "device.txt").read_text()  # the wheel's, before PYTHONPATH's
    assert "failed (exit 1)" in (tmp_path / "brought" / "summary.txt").read_text()
    assert "No module named 'nltk.tag'" in (tmp_path / "brought" / "actor.txt").read_text()
    from importlib.metadata import version

    assert version("nltk") != "0.0.1"  # nothing was installed into the interpreter's own environment


def _no_interpreter() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_every_triton_program_compiles_for_a_gpu_on_a_machine_without_one(tmp_path):
    """bench/triton_compile.py: the GPU path's launches recorded on the CPU, each compiled for sm_90 by
    Triton's own compiler, its registers and occupancy read from the cubin."""
    import json

    out = tmp_path / "compile.json"
    script = str(REPO / "bench" / "triton_compile.py")
    proc = subprocess.run([sys.executable, script, "--shapes", "tiny", "--json", str(out)], capture_output=True,
                          text=True, timeout=600, env=_no_interpreter())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["arch"] == 90 and report["failures"] == []
    programs = {r["program"] for r in report["programs"]}
    assert programs == {"head_outputs_t", "sign_gemm", "prox_tiles", "prox_list", "finish_rows", "direct_rows"}
    for r in report["programs"]:
        assert 0 < r["regs"] <= 255 and 0 < r["warps_per_sm"] <= 64 and r["warps"] in (1, 2, 4, 8, 16), r
    tiles = next(r for r in report["programs"] if r["program"] == "prox_tiles")
    assert tiles["constants"]["SPLIT"] is True and tiles["constants"]["BP"] == 16  # the GPU's tiles, not the interpreter's
    assert f"# {len(report['programs'])} programs compiled, 0 failed" in proc.stdout

    wider = subprocess.run([sys.executable, script, "--shapes", "tiny", "--set", "prox_tiles:BJ=32,num_warps=2"],
                           capture_output=True, text=True, timeout=600, env=_no_interpreter())
    assert wider.returncode == 0, wider.stderr[-2000:]
    row = next(line.split() for line in wider.stdout.splitlines() if line.split()[1:2] == ["prox_tiles"])
    assert row[3] == "2" and "BJ=32" in row and "BP=16" in row  # warps, then the changed and the kept tiles
    typo = subprocess.run([sys.executable, script, "--shapes", "tiny", "--set", "prox_tiles:BX=32"],
                          capture_output=True, text=True, timeout=600, env=_no_interpreter())
    assert typo.returncode == 2 and "['BX'] is not among its constants" in typo.stderr

    bad = subprocess.run([sys.executable, script, "--shapes", "tiny,huge"], capture_output=True, text=True,
                         timeout=120, env=_no_interpreter())
    assert bad.returncode == 2 and "unknown shape(s) ['huge']" in bad.stderr
    interp = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120,
                            env={**_no_interpreter(), "TRITON_INTERPRET": "1"})
    assert interp.returncode == 2 and "unset it" in interp.stderr and "Traceback" not in interp.stderr


def test_a_triton_program_that_does_not_compile_is_reported(tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import triton_compile as tc\n"
            "name, fn, args, kw = next(x for x in tc.record('tiny') if x[0] == 'prox_tiles')\n"
            "rows, failures = tc.compile_all([(name, fn, args, {**kw, 'BP': 3})], 90)\n"
            "print(len(rows), len(failures)); print(failures[0])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "bench")], capture_output=True, text=True,
                          timeout=600, env=_no_interpreter())
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts, failure = proc.stdout.splitlines()[:2]
    assert counts == "0 1" and failure.startswith("prox_tiles {") and "'BP': 3" in failure


def test_gpu_job_tiles_are_checked_before_anything_runs():
    for bad in ("16x24:64", "16x32", "16x32:8", "axb:16"):
        proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_job.py"), "--tiny", "--tiles", bad],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and f"--tiles {bad!r}: expected ROWSxSOURCES:HEAD_SOURCES" in proc.stderr, bad


def test_gpu_job_times_other_triton_tiles_side_by_side(tmp_path):
    """--tiles: the Triton job path again per tile setting, a row each (run by the interpreter here)."""
    import json
    import os

    out = tmp_path / "job.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_job.py"), "--tiny", "--repeats", "1",
                           "--backends", "triton", "--tiles", "16x16:16", "--no-eap", "--long", "", "--json",
                           str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["what"]: r for r in json.loads(out.read_text())["table"]}
    assert {"forward", "job triton", "job triton, tiles 16x16/16"} <= set(rows)
    assert rows["job triton, tiles 16x16/16"]["seconds"] > 0
