"""The benchmark scripts run (on tiny inputs here; their numbers come from real runs, see the README)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_script_runs_its_code_path_on_a_tiny_model():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_importance.py"), "--tiny", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# cpu (tiny Llama)")
    row = lines[2].split()
    assert row[0] == "64" and float(row[1]) > 0 and float(row[2]) > 0
    assert "T=128: edge importances fit" in proc.stdout
