"""A shard's commit: its two tables written first, then a ``done/<shard>.json`` marker that proves them.

The marker holds, for each file, its size, its sha256 and its row count, and the doc ids each table holds.
A marker is only trusted when the files still match it (``verify_shard``): a truncated, deleted or rewritten
output makes its shard pending again, and the job redoes it instead of reducing over a broken file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq

from flowray.pipeline.storage import Storage
from flowray.tables import parquet_layout

log = logging.getLogger(__name__)
MARKER_VERSION = 2  # 1: a summary only (no sizes/checksums), written by flowray before markers proved files
KINDS = ("predictions", "errors")


class ShardCheckError(Exception):
    """A commit marker that does not prove its files (internal: callers turn the reason into a decision)."""


def marker_path(shard_id: str) -> str:
    return f"done/{shard_id}.json"


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **parquet_layout(table.schema))  # codec and encoding per column
    return buf.getvalue()


def _doc_ids(table: pa.Table) -> list[str]:
    """The distinct doc ids of a table, in first-seen order (a prediction table has a row per position)."""
    return list(dict.fromkeys(table.column("doc_id").to_pylist()))


def commit_shard(storage: Storage, shard_id: str, predictions: pa.Table, errors: pa.Table, summary: dict) -> dict:
    """Write ``predictions/`` and ``errors/`` of ``shard_id``, then its marker (the commit point); return it."""
    files = {}
    for kind, table in (("errors", errors), ("predictions", predictions)):
        data = _parquet_bytes(table)
        rel = f"{kind}/{shard_id}.parquet"
        storage.write_bytes(rel, data)  # whole or not at all (see Storage)
        files[kind] = {"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                       "rows": table.num_rows, "doc_ids": _doc_ids(table)}
    marker = {**summary, "shard_id": shard_id, "marker_version": MARKER_VERSION, "files": files}
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


def load_shard(storage: Storage, shard_id: str, expected_doc_ids: list[str] | None = None
               ) -> tuple[dict, pa.Table, pa.Table]:
    """``(marker, predictions, errors)`` of a committed shard, each file checked against its marker.

    Raises ShardCheckError with the reason when a file is missing, has another size or checksum, does not
    parse, or holds other rows or doc ids than the marker says; with ``expected_doc_ids`` (the plan), also
    when the two tables together do not hold each planned doc exactly once.
    """
    marker = read_marker(storage, shard_id)
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


def verify_shard(storage: Storage, shard_id: str, expected_doc_ids: list[str] | None = None) -> str | None:
    """None when the marker of ``shard_id`` proves its files (and the plan, if given); else the reason."""
    try:
        load_shard(storage, shard_id, expected_doc_ids)
    except ShardCheckError as exc:
        return str(exc)
    return None


def pending_shards(storage: Storage, shards: list[dict]) -> tuple[list[str], list[str]]:
    """``(pending, redone)``: shard ids without a verified marker; ``redone`` had a marker that failed.

    A failing marker is removed first, so an interrupted redo is never mistaken for a commit.
    """
    pending, redone = [], []
    for shard in shards:
        sid = shard["shard_id"]
        reason = verify_shard(storage, sid, shard.get("doc_ids"))
        if reason is None:
            continue
        pending.append(sid)
        if reason != "no commit marker":
            log.warning("shard %s will be redone: %s", sid, reason)
            storage.delete(marker_path(sid))
            redone.append(sid)
    return pending, redone
