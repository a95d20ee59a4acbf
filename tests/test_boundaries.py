"""House-style boundaries: the maths and table modules stay free of ray and transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["flowray.importance", "flowray.routes", "flowray.tables", "flowray.text",
                                    "flowray.tasks", "flowray.config"])
def test_pure_modules_do_not_import_ray_or_transformers(module):
    code = (f"import importlib, sys; importlib.import_module({module!r}); "
            "bad = [m for m in ('ray', 'transformers') if m in sys.modules]; print(','.join(bad))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"{module} imported {proc.stdout.strip()}"


def test_only_the_pipeline_package_imports_ray():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "flowray"
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "pipeline" not in p.parts and ("import ray" in p.read_text() or "from ray" in p.read_text())]
    assert offenders == []
