"""The benchmark scripts run (on tiny inputs here; their numbers come from real runs, see the README)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_script_runs_its_code_path_on_a_tiny_model():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_importance.py"), "--tiny", "--repeats", "1",
                           "--tokens", "40", "--long", "96"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# cpu (tiny Llama)")
    assert lines[1].split()[:4] == ["T", "forward", "s", "flowray"]
    row = lines[2].split()
    assert row[0] == "40", "the --tokens asked for are the tokens timed"
    forward_s, flowray_s, ratio = float(row[1]), float(row[2]), float(row[3])
    assert forward_s > 0 and flowray_s > 0
    # the ratio the README quotes is the two columns of the same run divided, not a hand-made figure
    rounding = 5e-5 * (1 / forward_s + 1 / flowray_s) * ratio + 0.005  # the seconds are printed to 4 decimals
    assert ratio == pytest.approx(flowray_s / forward_s, abs=rounding)
    assert "# T=96: edge importances fit" in proc.stdout, "the --long context asked for is the one checked"


def test_gpu_job_benchmark_runs_its_code_path_on_a_tiny_model():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_job.py"), "--tiny", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# cpu (tiny Llama)")
    fwd, job = lines[2].split(), lines[3].split()
    assert fwd[0] == "forward" and job[:2] == ["job", "path"]
    assert float(fwd[2]) > 0 and float(job[3]) > 0  # tokens/s of both, measured
    assert 0 < float(job[4].rstrip("x")) < 10  # the ratio, printed from the two measurements
    assert "# T=128: runs" in proc.stdout and "# longest text that ran: 128 tokens" in proc.stdout


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
    assert header[:6] == ["mode", "dev_us", "pred/s", "busy", "idle_us", "B/pred"] and header[-1] == "host_us"
    rows = {}
    for line in lines[2:]:
        if line.startswith("#"):
            break
        cells = dict(zip(header, line.split()))
        steps = [float(cells[k]) for k in header[6:-1]]
        assert all(v >= 0 for v in steps) and float(cells["pred/s"]) > 0 and float(cells["B/pred"]) > 0
        assert float(cells["host_us"]) == pytest.approx(sum(steps), abs=0.05 * len(steps))  # the printed steps' sum
        assert 0 <= float(cells["busy"].rstrip("%")) <= busy_at_most
        rows[(cells["mode"], cells["dev_us"])] = cells
    return rows


def test_the_actor_host_benchmark_times_every_step_beside_a_stand_in_device():
    lines = _actor_host("--tiny")
    assert lines[0].startswith("# actor host: tiny shape (2 layers x 3 heads) on the simulated device")
    rows = _rows(lines)
    assert set(rows) == {("overlap", "0"), ("overlap", "55"), ("serial", "0"), ("serial", "55")}
    assert float(rows[("overlap", "55")]["idle_us"]) >= 0 and float(rows[("overlap", "55")]["encode"]) > 0


def test_the_actor_host_benchmark_runs_the_real_model_with_only_what_gpu_machines_have():
    lines = _actor_host("--tiny", "--device", "cpu", block=("polars", "ray", "datasets", "gguf", "matplotlib"))
    assert lines[0].startswith("# actor host: tiny shape (2 layers x 3 heads) on the CPU")
    # busy: the stage alone over the pipeline, two timings of a noisy machine (above 100% at times)
    assert set(_rows(lines, busy_at_most=float("inf"))) == {("overlap", "-"), ("serial", "-")}
