"""A shard's commit: its two tables written first, then a ``done/<shard>.json`` marker that proves them.

The marker holds, for each file, its size, its sha256 and its row count, and the doc ids each table holds,
and the identity of what made them (``flowray.pipeline.identity.shard_identity``: the config's content
hash, the shard layout, the size and sha256 of the input shard the worker read). A marker is only trusted
when the files still match it and its identity is the one the run's index plans for the shard
(``verify_shard``): a truncated, deleted or rewritten output, or one made by another config or from
another input, makes its shard pending again, and the job redoes it instead of reducing over it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq

from flowray.pipeline.identity import identity_mismatch, shard_identity
from flowray.pipeline.storage import Storage

log = logging.getLogger(__name__)
MARKER_VERSION = 2  # 1: a summary only (no sizes/checksums), written by flowray before markers proved files
KINDS = ("predictions", "errors")


class ShardCheckError(Exception):
    """A commit marker that does not prove its files (internal: callers turn the reason into a decision)."""


def marker_path(shard_id: str) -> str:
    return f"done/{shard_id}.json"


def parquet_layout(schema: pa.Schema) -> dict:
    """``pyarrow.parquet.write_table`` options for a table of ``flowray.tables``, column by column.

    Measured on the job's prediction rows (7B shape, synthetic values with SmolLM2's mix; and a real SmolLM2
    run): float vectors (list<float32>: components, shares) as BYTE_STREAM_SPLIT + zstd level 1 (the
    exponent bytes compress, the mantissas do not: zstd on plain floats costs as much and saves less);
    route lists (sorted small ints) as DELTA_BINARY_PACKED + zstd; both without dictionary (floats never
    repeat enough) or statistics (no reader filters on a list's element). Scalar columns keep dictionaries,
    zstd and statistics (readers filter on domain, doc_id, position). Against zstd with dictionaries and
    statistics everywhere: ~0.7x the encode + sha256 CPU and 0.86x the bytes at the 7B shape, 0.4x and 0.7x
    on SmolLM2's rows. Readers see the same schema and values. A list's Parquet leaf is ``<name>.list.element``.
    """
    vectors, ids, scalars = [], [], []
    for f in schema:
        if pa.types.is_list(f.type):
            leaf = f"{f.name}.list.element"
            (vectors if pa.types.is_floating(f.type.value_type) else ids).append(leaf)
        else:
            scalars.append(f.name)
    return {
        "compression": "zstd",
        "use_dictionary": scalars,
        "write_statistics": scalars,
        "column_encoding": {**dict.fromkeys(vectors, "BYTE_STREAM_SPLIT"), **dict.fromkeys(ids, "DELTA_BINARY_PACKED")},
    }


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **parquet_layout(table.schema))  # codec and encoding per column
    return buf.getvalue()


def _doc_ids(table: pa.Table) -> list[str]:
    """The distinct doc ids of a table, in first-seen order (a prediction table has a row per position)."""
    return list(dict.fromkeys(table.column("doc_id").to_pylist()))


def read_shard_input(storage: Storage, shard_id: str, content_hash: str, texts_per_shard: int
                     ) -> tuple[list[dict], dict]:
    """The texts of a prepared shard and the identity its outputs will carry (from the bytes read)."""
    data = storage.read_bytes(f"shards/{shard_id}.parquet")
    docs = pq.read_table(io.BytesIO(data)).to_pylist()
    return docs, shard_identity(content_hash, texts_per_shard, shard_id, data)


def commit_shard(storage: Storage, shard_id: str, predictions: pa.Table, errors: pa.Table, summary: dict,
                 identity: dict | None = None) -> dict:
    """Write ``predictions/`` and ``errors/`` of ``shard_id``, then its marker (the commit point); return it.

    ``identity``: from ``read_shard_input``; a marker without one is never accepted by a planned run.
    """
    files = {}
    for kind, table in (("errors", errors), ("predictions", predictions)):
        data = _parquet_bytes(table)
        rel = f"{kind}/{shard_id}.parquet"
        storage.write_bytes(rel, data)  # whole or not at all (see Storage)
        files[kind] = {"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                       "rows": table.num_rows, "doc_ids": _doc_ids(table)}
    marker = {**summary, "shard_id": shard_id, "marker_version": MARKER_VERSION, "files": files,
              "identity": identity}
    storage.write_json(marker_path(shard_id), marker)  # last: its presence means both files are there
    return marker


def read_marker(storage: Storage, shard_id: str) -> dict:
    """The marker of ``shard_id``; ShardCheckError when it is missing, unreadable or from an old flowray."""
    rel = marker_path(shard_id)
    if not storage.exists(rel):
        raise ShardCheckError("no commit marker")
    try:
        marker = json.loads(storage.read_bytes(rel))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ShardCheckError(f"{rel} is not valid JSON (truncated or overwritten?): {exc}") from None
    if not isinstance(marker, dict) or marker.get("marker_version") != MARKER_VERSION or \
            not isinstance(marker.get("files"), dict) or set(marker["files"]) != set(KINDS):
        raise ShardCheckError(f"{rel} is not a version-{MARKER_VERSION} marker with file sizes and checksums")
    return marker


def load_shard(storage: Storage, shard_id: str, expected_doc_ids: list[str] | None = None,
               identity: dict | None = None) -> tuple[dict, pa.Table, pa.Table]:
    """``(marker, predictions, errors)`` of a committed shard, each file checked against its marker.

    Raises ShardCheckError with the reason when a file is missing, has another size or checksum, does not
    parse, or holds other rows or doc ids than the marker says; with ``expected_doc_ids`` (the plan), also
    when the two tables together do not hold each planned doc exactly once; with ``identity`` (the plan's),
    when the marker records another (another config, shard layout or input file).
    """
    marker = read_marker(storage, shard_id)
    if identity is not None:
        reason = identity_mismatch(marker.get("identity"), identity)
        if reason:
            raise ShardCheckError(f"{marker_path(shard_id)}: {reason}")
    tables = {}
    for kind in KINDS:
        spec = marker["files"][kind]
        rel = spec["path"]
        if not storage.exists(rel):
            raise ShardCheckError(f"{rel} is missing")
        data = storage.read_bytes(rel)
        if len(data) != spec["bytes"]:
            raise ShardCheckError(f"{rel} is {len(data)} bytes, the marker says {spec['bytes']} (truncated?)")
        if hashlib.sha256(data).hexdigest() != spec["sha256"]:
            raise ShardCheckError(f"{rel} does not match the sha256 in its marker (rewritten or corrupted)")
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError) as exc:
            raise ShardCheckError(f"{rel} does not parse as Parquet: {exc}") from None
        if table.num_rows != spec["rows"] or _doc_ids(table) != spec["doc_ids"]:
            raise ShardCheckError(f"{rel} holds other rows than its marker lists")
        tables[kind] = table
    if expected_doc_ids is not None:
        reason = _plan_mismatch(marker, expected_doc_ids)
        if reason:
            raise ShardCheckError(reason)
    return marker, tables["predictions"], tables["errors"]


def _plan_mismatch(marker: dict, expected: list[str]) -> str | None:
    predicted, failed = marker["files"]["predictions"]["doc_ids"], marker["files"]["errors"]["doc_ids"]
    failed_rows = marker["files"]["errors"]["rows"]
    both = sorted(set(predicted) & set(failed))
    if both:
        return f"doc(s) {both[:3]} have both predictions and an error row"
    if failed_rows != len(failed):
        return "a doc has more than one error row"
    got = set(predicted) | set(failed)
    if got != set(expected):
        missing, extra = sorted(set(expected) - got), sorted(got - set(expected))
        return f"holds other docs than planned (missing {missing[:3]}, unplanned {extra[:3]})"
    return None


def verify_shard(storage: Storage, shard_id: str, expected_doc_ids: list[str] | None = None,
                 identity: dict | None = None) -> str | None:
    """None when the marker of ``shard_id`` proves its files (and the plan, if given); else the reason."""
    try:
        load_shard(storage, shard_id, expected_doc_ids, identity)
    except ShardCheckError as exc:
        return str(exc)
    return None


def pending_shards(storage: Storage, shards: list[dict]) -> tuple[list[str], list[str]]:
    """``(pending, redone)``: shard ids without a verified marker; ``redone`` had a marker that failed.

    ``shards``: the index's plan; a shard entry's ``identity``, when it has one, must be its marker's.
    A failing marker is removed first, so an interrupted redo is never mistaken for a commit.
    """
    pending, redone = [], []
    for shard in shards:
        sid = shard["shard_id"]
        reason = verify_shard(storage, sid, shard.get("doc_ids"), shard.get("identity"))
        if reason is None:
            continue
        pending.append(sid)
        if reason != "no commit marker":
            log.warning("shard %s will be redone: %s", sid, reason)
            storage.delete(marker_path(sid))
            redone.append(sid)
    return pending, redone


def remove_unplanned(storage: Storage, shards: list[dict]) -> list[str]:
    """Delete the markers, outputs and input shards of shard ids the plan does not have (an older layout
    of this run); return what was removed. Readers only read what markers list, so this is housekeeping."""
    planned = {s["shard_id"] for s in shards}
    removed = []
    for folder, suffix in (("done", ".json"), ("predictions", ".parquet"), ("errors", ".parquet"),
                           ("shards", ".parquet")):
        for name in storage.list(folder, suffix):
            if name.removesuffix(suffix) not in planned:
                storage.delete(f"{folder}/{name}")
                removed.append(f"{folder}/{name}")
    if removed:
        log.warning("removed %d files of shards this run does not plan (an older shard layout): %s%s",
                    len(removed), ", ".join(removed[:4]), ", ..." if len(removed) > 4 else "")
    return removed
