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


CLI_MODULES = {"flowray.cli", "flowray.cli_types"}  # plus every subpackage's cli.py (flowray.pipeline.cli, ...)


def _module_name(path, root) -> str:
    return ".".join(("flowray", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")


def _is_cli(name: str) -> bool:
    return name in CLI_MODULES or name.endswith(".cli")


def test_only_cli_modules_import_the_cli():
    """The library never imports the CLI (the CLI imports the library), so no cycle hides behind lazy imports."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "flowray"
    offenders = []
    for path in root.rglob("*.py"):
        name = _module_name(path, root)
        if _is_cli(name):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            offenders += [f"{name} imports {t}" for t in targets if t.startswith("flowray") and _is_cli(t)]
    assert offenders == []


def test_the_cli_imports_its_subcommands_statically_and_stays_light():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "flowray"
    for path in [root / "cli.py", *root.rglob("cli.py")]:
        text = path.read_text()
        assert "__import__" not in text and "import_module" not in text, path
    code = ("import sys, flowray.cli; "
            "print(','.join(m for m in ('torch', 'transformers', 'ray', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"importing flowray.cli imported {proc.stdout.strip()}"
