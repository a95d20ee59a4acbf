"""Helpers shared by the analysis notebooks: a run (local path or bucket URI), its manifest, head grids, figures.

Every notebook starts from ``open_run(RUN)``. The model's dimensions, the taus, the general domain and the
domain names all come from the run's ``manifest.json`` (and the config it embeds), so the notebooks run
unchanged on a SmolLM2 run on a laptop and on a Llama-2-7B run in a bucket. Paths inside a run are joined
with "/" (never ``pathlib``) so that ``s3://bucket/prefix`` stays a URI; polars reads those directly.

Relative local paths (the notebooks' defaults ``runs/shared_data`` and ``out/figures``) are taken
relative to the repository root, so a notebook gives the same answer run from the root or from analysis/.
Heads are ``(layer, head)`` pairs, 0-based, flat id ``layer * n_heads + head`` as in the job's outputs.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import numpy as np
import polars as pl

from flowray.errors import InputError

ANALYSIS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(ANALYSIS_DIR)

# Colours of the paper's head roles (figure 9: previous-token heads yellow, subword-merging heads red).
ROLE_COLOURS = {"previous_token": "#f2c500", "subword_merging": "#d62728"}


class RunNotReadyError(InputError):
    """The run directory has no manifest.json: the job has not finished (the manifest is written last)."""


# --- paths ------------------------------------------------------------------------------------------
def is_uri(path: str) -> bool:
    return "://" in path


def resolve(path: str) -> str:
    """A URI or absolute path as is; a relative local path relative to the repository root."""
    if is_uri(path) or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(REPO_ROOT, path))


def join(base: str, *parts: str) -> str:
    """URI-safe join: ``join("s3://b/run", "tables", "x.parquet")`` -> ``s3://b/run/tables/x.parquet``."""
    out = base.rstrip("/")
    for part in parts:
        out += "/" + part.strip("/")
    return out


def _filesystem(uri: str):
    import pyarrow.fs as pafs

    if is_uri(uri) and not uri.startswith("file://"):
        return pafs.FileSystem.from_uri(uri)  # (filesystem, path inside it)
    return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))


def read_bytes(uri: str) -> bytes:
    fs, path = _filesystem(uri)
    with fs.open_input_stream(path) as fh:
        return fh.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = _filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as fh:
        fh.write(data)


# --- the run ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """A finished job run: where it is and what its manifest says."""

    uri: str
    manifest: dict

    @property
    def n_layers(self) -> int:
        return int(self.manifest["model"]["n_layers"])

    @property
    def n_heads(self) -> int:
        return int(self.manifest["model"]["n_heads"])

    @property
    def model_spec(self) -> str:
        return self.manifest["model"]["spec"]

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def taus(self) -> list[float]:
        return [float(t) for t in self.config["tau"]]

    @property
    def general(self) -> str:
        return self.config["general_domain"]

    @property
    def domains(self) -> list[str]:
        """Domain names in config order (the order the run's author chose)."""
        names = [c["domain"] for c in self.config.get("corpora", [])]
        return names or sorted(self.manifest["domains"])

    def corpus(self, domain: str) -> dict:
        for c in self.config.get("corpora", []):
            if c["domain"] == domain:
                return c
        raise InputError(f"domain {domain!r} is not in this run; expected one of {self.domains}")

    def language(self, domain: str) -> str:
        return self.corpus(domain).get("language", "en")

    def is_task(self, domain: str) -> bool:
        return self.corpus(domain)["source"]["kind"] == "task"

    def closest_tau(self, wanted: float) -> float:
        """The run's tau nearest to ``wanted`` (the paper's values need not be among the run's)."""
        return min(self.taus, key=lambda t: (abs(t - wanted), t))

    def path(self, *parts: str) -> str:
        return join(self.uri, *parts)

    def files(self, kind: str) -> list[str]:
        """The run's ``kind`` files (``predictions`` or ``errors``): exactly those its verified commit markers
        list in the manifest. Never a glob: a run directory may hold files of an older shard layout."""
        listed = (self.manifest.get("outputs") or {}).get(kind)
        if listed is None:
            raise RunNotReadyError(
                f"the manifest of {self.uri} does not list its {kind} files (written by an older flowray); "
                "produce the run again with `flowray job run --restart` and its config")
        return [self.path(rel) for rel in listed]

    def predictions(self) -> pl.LazyFrame:
        """One row per prediction (see ``flowray.tables.predictions_schema``)."""
        return pl.scan_parquet(self.files("predictions"))

    def table(self, name: str) -> pl.LazyFrame:
        rel = self.manifest.get("tables", {}).get(name, f"tables/{name}.parquet")
        return pl.scan_parquet(self.path(rel))

    def describe(self) -> str:
        counts = self.manifest.get("counts", {})
        return (f"run {self.manifest.get('run_name')!r} at {self.uri}: model {self.model_spec!r} "
                f"({self.n_layers} layers x {self.n_heads} heads), tau {self.taus}, general domain "
                f"{self.general!r}, {counts.get('texts_in')} texts, {counts.get('predictions_written')} "
                f"predictions, {counts.get('error_rows')} error rows")


def open_run(run: str) -> Run:
    """Read ``<run>/manifest.json`` from a local path or a bucket URI."""
    uri = resolve(run)
    try:
        manifest = json.loads(read_bytes(join(uri, "manifest.json")))
    except (FileNotFoundError, OSError) as exc:
        raise RunNotReadyError(
            f"no manifest.json under {uri!r}: not a finished flowray run (the job writes the manifest last). "
            "Produce one with `flowray job run --config shared_data` and point FLOWRAY_RUN at "
            "<output>/<run_name>") from exc
    return Run(uri=uri, manifest=manifest)


def task_pairs(run: Run) -> list[dict]:
    """Task domains with their contrastive twins: ``{task, original, contrastive, label}`` per twin domain.

    Found from the sources in the config (task, variant and task options), not from domain names. A twin
    pairs with the original of the same task; greater-than twins are labelled by their YY.
    """
    originals, twins = {}, []
    for c in run.config.get("corpora", []):
        src = c["source"]
        if src.get("kind") != "task":
            continue
        if src.get("variant") == "original":
            originals.setdefault(src["task"], c["domain"])
        else:
            twins.append(c)
    pairs = []
    for c in twins:
        src = c["source"]
        if src["task"] not in originals:
            continue
        if "contrastive_yy" in src:
            label = f"YY={src['contrastive_yy']}"
        else:
            label = {"ioi": "ABC"}.get(src["task"], "contrastive")
        pairs.append({"task": src["task"], "original": originals[src["task"]], "contrastive": c["domain"],
                      "label": label})
    return pairs


# --- heads ------------------------------------------------------------------------------------------
def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def grid(df: pl.DataFrame, value: str, n_layers: int, n_heads: int) -> np.ndarray:
    """``[n_layers, n_heads]`` matrix of ``value`` from a long frame with layer/head columns (NaN: absent)."""
    out = np.full((n_layers, n_heads), np.nan)
    rows = df.select("layer", "head", value).drop_nulls(["layer", "head"])
    out[rows["layer"].to_numpy(), rows["head"].to_numpy()] = rows[value].to_numpy()
    return out


def explode_heads(lf: pl.LazyFrame, column: str, n_heads: int) -> pl.LazyFrame:
    """One row per (prediction, head in ``column``), with ``layer``/``head`` from the flat id."""
    return (lf.explode(column).drop_nulls(column)
            .with_columns((pl.col(column).cast(pl.Int32) // n_heads).alias("layer"),
                          (pl.col(column).cast(pl.Int32) % n_heads).alias("head")))


def plot_head_grid(ax, values: np.ndarray, *, title: str = "", cmap: str = "viridis", vmin=None, vmax=None,
                   label: str = ""):
    """Layer x head heatmap (layers along x, bottom-to-top left-to-right; heads along y). ``values``
    ``[n_layers, n_heads]``; NaN cells are left blank. Returns the image for a colorbar."""
    n_layers, n_heads = values.shape
    img = ax.imshow(values.T, origin="lower", aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                    interpolation="nearest")
    ax.set_xlabel("layer")
    ax.set_ylabel("head")
    ax.set_title(title, fontsize=10)
    step_l = max(1, n_layers // 15)
    step_h = max(1, n_heads // 8)
    ax.set_xticks(range(0, n_layers, step_l))
    ax.set_yticks(range(0, n_heads, step_h))
    ax.tick_params(labelsize=7)
    if label:
        cbar = ax.figure.colorbar(img, ax=ax, fraction=0.04, pad=0.02)
        cbar.set_label(label, fontsize=8)
        cbar.ax.tick_params(labelsize=7)
    return img


def mark_heads(ax, heads, *, colour: str, label: str | None = None, size: float = 60, lw: float = 1.6,
               outline: bool = True):
    """Ring the given ``(layer, head)`` cells of a ``plot_head_grid`` axes (a thin black outline keeps a
    yellow ring visible on a yellow cell)."""
    heads = list(heads)
    if not heads:
        return
    layers, hs = zip(*heads)
    if outline:
        ax.scatter(layers, hs, s=size, facecolors="none", edgecolors="black", linewidths=lw + 1.4)
    ax.scatter(layers, hs, s=size, facecolors="none", edgecolors=colour, linewidths=lw, label=label)


def top_heads(values: np.ndarray, k: int) -> list[tuple[int, int, float]]:
    """The ``k`` largest cells of a ``[n_layers, n_heads]`` grid as ``(layer, head, value)``."""
    flat = np.where(np.isnan(values), -np.inf, values).ravel()
    order = np.argsort(-flat, kind="stable")[:k]
    n_heads = values.shape[1]
    return [(int(i // n_heads), int(i % n_heads), float(values.flat[i])) for i in order]


# --- figures ----------------------------------------------------------------------------------------
def save_figure(fig, figures: str, name: str, *, dpi: int = 110) -> None:
    """Write ``fig`` as ``<figures>/<name>.png`` (a local folder or a bucket URI) and say where.

    The figure stays open so that Jupyter still shows it under the cell.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    target = join(resolve(figures), f"{name}.png")
    write_bytes(target, buf.getvalue())
    print(f"saved {target} ({buf.tell() // 1024} KiB)")
