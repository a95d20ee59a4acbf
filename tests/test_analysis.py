"""The analysis notebooks (analysis/*.py, jupytext percent format) on real job outputs.

Two small runs of the shipped shared-data config feed them: one with the packaged SmolLM2 (30 layers x 9
heads) and one with a tiny random Llama (2 layers x 3 heads), read through ``file://`` URIs. Every notebook
must execute top to bottom on both and write its PNGs; the second run shows that the notebooks take the
model's dimensions, taus and domains from the manifest rather than from SmolLM2, and that run and figure
locations may be URIs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from conftest import REPO, SHARED_DATA, needs_shared

pytestmark = pytest.mark.slow  # the tests that run a job need shared data; the helpers' tests run anywhere

ANALYSIS = REPO / "analysis"
sys.path.insert(0, str(ANALYSIS))
import common  # analysis/common.py
import run_all  # analysis/run_all.py

FIGURES = {
    "ioi_greater_than": ["fig6_ioi_activation", "fig7_greater_than_activation", "fig6b_ioi_source_edge_contrast",
                         "fig7b_greater_than_source_edge_contrast"],
    "pos": ["fig8_pos_tsne"],
    "bottom_to_top": ["fig9a_bottom_to_top", "fig9_role_criteria", "fig9b_first_period"],
    "domains": ["fig10_domains", "fig10_domain_difference", "fig10_specific_head_overlap"],
    "svd_heads": ["fig11_svd_heads"],
}
PARAMS = {"pos": {"N_POINTS": 300, "PERPLEXITY": 10.0}}  # a small t-SNE keeps the file fast


def _job(out, *overrides: str):
    cmd = [sys.executable, "-m", "flowray.cli", "job", "run", "--config", "shared_data",
           "--set", "run_name=small", "--set", f"output={out}", "--set", "texts_per_domain=3",
           "--set", "actors=1", *[a for o in overrides for a in ("--set", o)]]
    env = {**os.environ, "FLOWRAY_SHARED_DATA": str(SHARED_DATA)}
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = out / "small"
    assert (run / "manifest.json").is_file()
    return run


@pytest.fixture(scope="session")
def smollm2_run(tmp_path_factory):
    return _job(tmp_path_factory.mktemp("analysis-smollm2"), "max_tokens=32")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir):
    return _job(tmp_path_factory.mktemp("analysis-tiny"), f"model={tiny_model_dir}", "max_tokens=23")  # a task prompt + BOS fits its 24 positions


def _text_outputs(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or o.get("data", {}).get("text/plain", ""))
    return "\n".join(out)


def _check_figures(folder, name):
    import matplotlib.image as mpimg

    for fig in FIGURES[name]:
        path = folder / f"{fig}.png"
        assert path.is_file(), f"{name}.py did not write {path.name}; wrote {sorted(p.name for p in folder.iterdir())}"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert 10_000 < path.stat().st_size < 400_000, (path.name, path.stat().st_size)
        img = mpimg.imread(path)
        assert img.shape[0] > 200 and img.shape[1] > 300, (path.name, img.shape)
        assert float(img[..., :3].std()) > 0.02, f"{path.name} is (nearly) blank"


# --- every notebook, top to bottom --------------------------------------------------------------
@needs_shared
@pytest.mark.parametrize("name", run_all.NOTEBOOKS)
def test_notebook_runs_on_a_smollm2_run(name, smollm2_run, tmp_path):
    nb = run_all.execute_notebook(name, run=str(smollm2_run), figures=str(tmp_path), params=PARAMS.get(name),
                                  timeout=600)
    _check_figures(tmp_path, name)
    text = _text_outputs(nb)
    assert "30 layers x 9 heads" in text  # run.describe(): the dims came from the manifest
    if name == "ioi_greater_than":
        # the three task/twin pairs of the shipped config, YY=00 included, all paired prompt by prompt
        for pair in ("ioi vs ioi_contrastive (ABC): 3 paired", "greater_than vs greater_than_contrastive (YY=01): 3",
                     "greater_than vs greater_than_contrastive_00 (YY=00): 3"):
            assert pair in text, text[:3000]
    if name == "svd_heads":
        assert "rank 64" in text  # W_OV of a SmolLM2 head has rank d_head


@needs_shared
@pytest.mark.parametrize("name", run_all.NOTEBOOKS)
def test_notebook_runs_on_another_models_run_through_uris(name, tiny_run, tmp_path):
    nb = run_all.execute_notebook(name, run=tiny_run.as_uri(), figures=(tmp_path / "figs").as_uri(),
                                  params=PARAMS.get(name), timeout=600)
    _check_figures(tmp_path / "figs", name)
    assert "2 layers x 3 heads" in _text_outputs(nb)


# --- the runner and the shared helpers ------------------------------------------------------------
def test_runner_reports_a_failed_notebook(tmp_path, capsys):
    code = run_all.main(["--run", str(tmp_path / "no-such-run"), "--figures", str(tmp_path / "f"),
                         "--only", "bottom_to_top"])
    assert code == 1
    assert "RunNotReadyError" in capsys.readouterr().err


def test_runner_overrides_parameters():
    assert run_all.parse_overrides(["pos.N_POINTS=400", "domains.DOMAINS=['c4', 'code']", "svd_heads.DEVICE=cpu"]) == {
        "pos": {"N_POINTS": 400}, "domains": {"DOMAINS": ["c4", "code"]}, "svd_heads": {"DEVICE": "cpu"}}
    for bad in ("N_POINTS=3", "nope.X=1", "pos.N_POINTS"):
        with pytest.raises(SystemExit):
            run_all.parse_overrides([bad])


def test_paths_stay_uris_and_relative_paths_are_repo_relative():
    assert common.join("s3://bucket/flowray/run/", "tables", "head_roles.parquet") == \
        "s3://bucket/flowray/run/tables/head_roles.parquet"
    assert common.resolve("gs://b/x") == "gs://b/x"
    assert common.resolve("/abs/run") == "/abs/run"
    assert common.resolve("runs/shared_data") == str(REPO / "runs" / "shared_data")


@needs_shared
def test_run_reads_everything_from_the_manifest(smollm2_run):
    run = common.open_run(smollm2_run.as_uri())
    manifest = json.loads((smollm2_run / "manifest.json").read_text())
    assert (run.n_layers, run.n_heads) == (manifest["model"]["n_layers"], manifest["model"]["n_heads"]) == (30, 9)
    assert run.taus == [0.01, 0.03, 0.04]
    assert run.closest_tau(0.012) == 0.01 and run.closest_tau(0.032) == 0.03 and run.closest_tau(1.0) == 0.04
    assert run.general == "c4" and run.domains[0] == "c4"
    pairs = {(p["original"], p["contrastive"], p["label"]) for p in common.task_pairs(run)}
    assert pairs == {("ioi", "ioi_contrastive", "ABC"), ("greater_than", "greater_than_contrastive", "YY=01"),
                     ("greater_than", "greater_than_contrastive_00", "YY=00")}
    n = run.predictions().filter(pl.col("domain") == "c4").select(pl.len()).collect().item()
    assert n == manifest["counts"]["predictions_written"] - run.predictions().filter(
        pl.col("domain") != "c4").select(pl.len()).collect().item()


def test_open_run_without_manifest_says_how_to_make_one(tmp_path):
    (tmp_path / "predictions").mkdir()
    with pytest.raises(common.RunNotReadyError, match="flowray job run"):
        common.open_run(str(tmp_path))


def test_grid_and_top_heads():
    df = pl.DataFrame({"layer": [0, 1, 1], "head": [2, 0, 1], "v": [0.5, 0.25, 0.75]})
    g = common.grid(df, "v", 2, 3)
    assert g.shape == (2, 3)
    assert g[0, 2] == 0.5 and g[1, 1] == 0.75 and np.isnan(g[0, 0])
    assert common.top_heads(g, 2) == [(1, 1, 0.75), (0, 2, 0.5)]


def test_figures_go_to_an_ignored_folder_unless_asked(tmp_path):
    """Neither run_all.py nor a notebook run as a script writes over the committed analysis/figures."""
    import re

    defaults = {"run_all.py": run_all.DEFAULT_FIGURES}
    for name in run_all.NOTEBOOKS:
        found = re.search(r'^FIGURES = os\.environ\.get\("FLOWRAY_FIGURES", "([^"]+)"\)', (ANALYSIS / f"{name}.py").read_text(), re.M)
        assert found, f"{name}.py: no FIGURES parameter"
        defaults[f"{name}.py"] = found.group(1)
    for where, folder in defaults.items():
        ignored = subprocess.run(["git", "check-ignore", "-q", f"{folder}/fig.png"], cwd=REPO, check=False)
        assert ignored.returncode == 0, f"{where} writes its figures to {folder}/, which git tracks"


def test_a_notebook_kernel_starts_without_the_unencrypted_tcp_warning(capfd):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")])
    run_all.execute(nb, timeout=60)
    assert nb.cells[0].outputs[0]["text"] == "42\n"
    err = capfd.readouterr().err  # the kernel process writes its log to this process's stderr
    assert "without encryption" not in err and "WARNING" not in err, err
    assert not _kernels_of(os.getpid()), "the kernel outlived its notebook"


def _kernels_of(pid: int) -> list[str]:
    """Command lines of the running ipykernel processes whose parent is ``pid`` (Linux /proc)."""
    from pathlib import Path

    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if ppid == pid and "ipykernel" in cmd:
            found.append(cmd)
    return found
