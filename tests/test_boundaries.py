"""House-style boundaries: the maths and table modules stay free of ray and transformers, no two flowray
modules import each other (directly or round a longer loop), and the reduce draws nothing."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "flowray"


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


def test_only_the_triton_files_of_the_kernels_package_import_triton():
    """A machine without triton (every CPU install) imports all of flowray but those files."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if any(n == "triton" or n.startswith("triton.") for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders and all(o.startswith("kernels/triton_") for o in offenders), offenders


CLI_MODULES = {"flowray.cli", "flowray.cli_types", "flowray.cli_common"}  # plus every subpackage's cli.py (flowray.pipeline.cli, ...)


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


# --- the module graph ------------------------------------------------------------------------------
def _import_targets(tree: ast.AST, package: str, modules: set[str]) -> set[str]:
    """What one module's import statements name: flowray modules whole, anything else by its top-level name.

    ``from pkg import name`` is the submodule ``pkg.name`` when there is one, else ``pkg`` itself.
    """
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package, up level - 1 packages
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names += [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    targets = set()
    for name in names:
        if name.split(".")[0] != "flowray":
            targets.add(name.split(".")[0])
            continue
        while name not in modules and "." in name:  # `import flowray.x.y` of a name inside flowray.x
            name = name.rpartition(".")[0]
        targets.add(name)
    return targets


def module_graph() -> dict[str, set[str]]:
    """Every flowray module -> what it imports (flowray modules and third-party top-level names).

    Every import statement counts wherever it stands: at the top, late in the module, inside a function or
    under ``if TYPE_CHECKING``. A late import only changes when Python runs it, not that the two modules
    need each other, and the loops this test guards against were hidden exactly so. What is not counted: a
    submodule's implicit import of its own package's ``__init__`` (Python runs it first for every
    submodule, so a package face that re-exports its submodules would always be a loop), and names given
    to ``importlib.import_module`` as strings (the lazy package faces).
    """
    paths = {_module_name(p, ROOT): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = _import_targets(ast.parse(path.read_text()), package, set(paths)) - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue  # third-party
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_inside_the_package():
    graph = module_graph()
    assert len(graph) > 50 and "flowray.tables" in graph["flowray.pipeline.reduce"]  # the graph was read
    loops = [" <-> ".join(c) + " (" + "; ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a] & set(c))) + ")"
             for c in _cycles(graph)]
    assert loops == [], "modules that import each other: " + " | ".join(loops)


def test_the_cycle_finder_finds_a_late_loop():
    assert _cycles({"a": {"b"}, "b": {"c", "numpy"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from flowray.models import families\n")
    assert _import_targets(tree, "flowray.models", {"flowray.models", "flowray.models.families"}) == \
        {"flowray.models.families"}


def test_the_reduce_imports_no_plotting_module():
    """The reduce writes tables and the manifest; the figures and pages are flowray.run_report's."""
    graph = module_graph()
    reached, todo = set(), ["flowray.pipeline.reduce"]
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        todo += [t for t in graph.get(name, ()) if t.startswith("flowray")]
    plotting = {"flowray.plots", "flowray.run_report", "flowray.explorer.report"}
    assert "flowray.tables" in reached and not reached & plotting, sorted(reached & plotting)
    drawers = sorted(m for m in reached if graph[m] & {"matplotlib", "PIL"})
    assert drawers == [], f"the reduce reaches modules that draw: {drawers}"


def test_no_module_takes_another_modules_private_names():
    """A piece two modules share is public in one of them; ``_names`` stay inside their module."""
    known = {("flowray.stats", "flowray.api", "_unpack")}  # flowray.models.loading.model_parts is its public twin
    found = set()
    for path in ROOT.rglob("*.py"):
        name = _module_name(path, ROOT)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flowray"):
                found |= {(name, node.module, a.name) for a in node.names
                          if a.name.startswith("_") and node.module != name}
    assert found - known == set()


def test_problems_are_raised_as_named_errors():
    """Bad input, a missing library or an unusable model is a ``flowray.errors`` class (a FlowrayError the
    CLI turns into one line), never a bare built-in exception."""
    bare = {"ValueError", "ImportError", "RuntimeError", "KeyError", "TypeError", "ModuleNotFoundError"}
    known = {("flowray.explorer.page", "RuntimeError")}  # the packaged page template lacks a marker: a broken install
    found = set()
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(exc, ast.Name) and exc.id in bare:
                    found.add((_module_name(path, ROOT), exc.id))
    assert found - known == set()
