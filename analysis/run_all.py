"""Execute the analysis notebooks (jupytext percent-format .py files) top to bottom on one run.

    python analysis/run_all.py --run runs/shared_data                     # every notebook -> out/figures
    python analysis/run_all.py --run s3://bucket/flowray/llama2-7b-domains --only domains svd_heads
    python analysis/run_all.py --run /tmp/flowray-runs/shared_data --set pos.N_POINTS=1000 --executed out/nb

Each notebook is converted with jupytext and executed with nbclient in a fresh kernel, with the working
directory at the repository root and ``FLOWRAY_RUN`` / ``FLOWRAY_FIGURES`` in its environment. ``--set
NOTEBOOK.NAME=VALUE`` overrides a variable of a notebook's parameters cell (the cell tagged
``parameters``) by inserting a cell right after it, as papermill does; VALUE is a Python literal (a bare
word is taken as a string). ``--executed DIR`` also writes the executed notebooks (.ipynb, with outputs).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
NOTEBOOKS = ("ioi_greater_than", "pos", "bottom_to_top", "domains", "svd_heads")
# git-ignored, so a run never overwrites the figures committed in analysis/figures (refresh those on purpose
# with --figures analysis/figures)
DEFAULT_FIGURES = "out/figures"


class NotebookFailed(RuntimeError):
    """A cell raised; the message names the notebook, the cell and the error."""


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """``["pos.N_POINTS=400"]`` -> ``{"pos": {"N_POINTS": 400}}``."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        notebook, dot, name = key.partition(".")
        if not sep or not dot or notebook not in NOTEBOOKS or not name.isidentifier():
            raise SystemExit(f"--set wants NOTEBOOK.NAME=VALUE with NOTEBOOK in {list(NOTEBOOKS)}; got {item!r}")
        out.setdefault(notebook, {})[name] = _literal(value)
    return out


def execute_notebook(name: str, *, run: str, figures: str, params: dict | None = None, timeout: int = 900,
                     executed_dir: str | None = None):
    """Execute ``analysis/<name>.py``; returns the executed notebook (nbformat). Raises NotebookFailed."""
    import jupytext
    import nbformat
    from nbclient.exceptions import CellExecutionError

    nb = jupytext.read(os.path.join(HERE, f"{name}.py"))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if params:
        at = next((i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), None)
        if at is None:
            raise NotebookFailed(f"{name}: no cell tagged 'parameters' to override {sorted(params)}")
        lines = [f"{key} = {value!r}" for key, value in params.items()]
        cell = nbformat.v4.new_code_cell("# injected by run_all.py --set\n" + "\n".join(lines))
        cell.metadata["tags"] = ["injected-parameters"]
        nb.cells.insert(at + 1, cell)
    env_before = {k: os.environ.get(k) for k in ("FLOWRAY_RUN", "FLOWRAY_FIGURES", "MPLBACKEND")}
    os.environ.update(FLOWRAY_RUN=run, FLOWRAY_FIGURES=figures, MPLBACKEND="module://matplotlib_inline.backend_inline")
    try:
        try:
            execute(nb, timeout=timeout)
        except CellExecutionError as exc:
            raise NotebookFailed(f"{name}.py failed:\n{exc}") from None
    finally:
        for key, value in env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if executed_dir:
            os.makedirs(executed_dir, exist_ok=True)
            nbformat.write(nb, os.path.join(executed_dir, f"{name}.ipynb"))
    return nb


def execute(nb, *, timeout: int = 900) -> None:
    """Run every cell of ``nb`` in a fresh kernel whose working directory is the repository root.

    The kernel talks to this process over Unix sockets in a private folder, not over TCP: nothing listens
    on the network, and ipykernel has nothing to warn about (it warns about unencrypted TCP on every start).
    """
    import tempfile

    from nbclient import NotebookClient
    from traitlets.config import Config

    with tempfile.TemporaryDirectory(prefix="flowray-kernel-") as sockets:
        config = Config()
        config.KernelManager.transport = "ipc"
        config.KernelManager.ip = os.path.join(sockets, "kernel")
        # the client makes (and so shuts down) its own kernel manager, configured here
        NotebookClient(nb, config=config, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": REPO_ROOT}}).execute()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=os.environ.get("FLOWRAY_RUN", "runs/shared_data"),
                    help="run directory (<output>/<run_name>) or bucket URI; default $FLOWRAY_RUN or runs/shared_data")
    ap.add_argument("--figures", default=os.environ.get("FLOWRAY_FIGURES", DEFAULT_FIGURES),
                    help=f"where the PNGs go (a folder or a bucket URI); default $FLOWRAY_FIGURES or {DEFAULT_FIGURES} "
                    "(analysis/figures holds the committed ones)")
    ap.add_argument("--only", nargs="+", choices=NOTEBOOKS, help="run only these notebooks")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="NOTEBOOK.NAME=VALUE",
                    help="override a parameters-cell variable, e.g. pos.N_POINTS=1000 (repeatable)")
    ap.add_argument("--executed", metavar="DIR", help="also write the executed notebooks (.ipynb) here")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per cell (default 900)")
    args = ap.parse_args(argv)

    def here(path: str) -> str:  # paths given on the command line are relative to where it is run
        return path if "://" in path or os.path.isabs(path) else os.path.abspath(path)

    overrides = parse_overrides(args.overrides)
    failed = []
    for name in args.only or NOTEBOOKS:
        started = time.time()
        try:
            execute_notebook(name, run=here(args.run), figures=here(args.figures), params=overrides.get(name),
                             timeout=args.timeout, executed_dir=args.executed and here(args.executed))
            print(f"ok      {name}.py  ({time.time() - started:.0f} s)", flush=True)
        except NotebookFailed as exc:
            failed.append(name)
            print(f"FAILED  {name}.py  ({time.time() - started:.0f} s)\n{exc}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
