"""What a run is bound to: its config's content, its corpus's source files, and each shard's input.

``corpus_fingerprint`` records, per domain, the files a source reads (path, size, mtime and, up to
``HASH_LIMIT_BYTES``, sha256) or the interpreter whose standard library it reads. A resume compares the
recorded fingerprint with the files as they are now (``corpus_changes``): sizes and mtimes first, contents
only when an mtime moved, so a resume never re-reads an unchanged corpus. Hub datasets are known by name
only (path, config name, split): their content cannot be seen offline.
"""

from __future__ import annotations

import glob
import hashlib
import os
import platform
import sysconfig
from pathlib import Path

from flowray.errors import FlowrayError
from flowray.io_checks import sha256_file

HASH_LIMIT_BYTES = 256 << 20  # bigger source files are fingerprinted by size and mtime only


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_changes(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for each content key that differs (corpora named by domain)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "corpora" and isinstance(a, list) and isinstance(b, list):
            before = {c.get("domain"): c for c in a if isinstance(c, dict)}
            after = {c.get("domain"): c for c in b if isinstance(c, dict)}
            for domain in sorted(set(before) | set(after), key=str):
                if before.get(domain) != after.get(domain):
                    out.append(f"corpus {domain!r}: {_short(before.get(domain))} -> {_short(after.get(domain))}")
            continue
        out.append(f"{key}: {_short(a)} -> {_short(b)}")
    return out


def _short(value) -> str:
    text = "(none)" if value is None else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


# --- corpus -------------------------------------------------------------------------------------------
def _source_files(source: dict) -> list[Path]:
    """The local files a source reads: its paths, or a hub dataset's local folder / ``data_files``."""
    from flowray.corpora import source_files, validate_source

    src = validate_source(source)
    if src["kind"] != "hf":
        return source_files(src)
    found: list[Path] = []
    local = Path(src["path"]).expanduser()
    if local.is_file():
        found.append(local)
    elif local.is_dir():
        found += sorted(p for p in local.rglob("*") if p.is_file() and ".cache" not in p.relative_to(local).parts)
    data_files = src["data_files"]
    entries = [data_files] if isinstance(data_files, str) else data_files if isinstance(data_files, list) else \
        [f for files in (data_files or {}).values() for f in files]
    base = local if local.is_dir() else Path.cwd()
    for entry in entries:
        path = Path(entry).expanduser()
        found += sorted(Path(m) for m in glob.glob(str(path if path.is_absolute() else base / path), recursive=True)
                        if os.path.isfile(m))
    return list(dict.fromkeys(found))


def _file_record(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": sha256_file(path) if st.st_size <= HASH_LIMIT_BYTES else None}


def _interpreter(source: dict) -> str | None:
    """Sources that read this Python's own files are bound to its version and location."""
    if source.get("kind") in ("stdlib_code", "pydoc_topics"):
        return f"Python {platform.python_version()} at {sysconfig.get_paths()['stdlib']}"
    return None


def corpus_fingerprint(corpora) -> dict:
    """``{domain: {"files": [...], "interpreter": ...}}`` for the ``CorpusConfig``s of a run."""
    return {c.domain: {"files": [_file_record(p) for p in _source_files(c.source)],
                       "interpreter": _interpreter(c.source)} for c in corpora}


def _file_changes(domain: str, recorded: list[dict], now: list[Path]) -> list[str]:
    out = []
    before = {r["path"]: r for r in recorded}
    after = {str(p): p for p in now}
    for path in sorted(set(after) - set(before)):
        out.append(f"corpus {domain!r}: {path} is new")
    for path in sorted(set(before) - set(after)):
        out.append(f"corpus {domain!r}: {path} is gone")
    for path in sorted(set(before) & set(after)):
        rec, st = before[path], os.stat(path)
        if st.st_size != rec["bytes"]:
            out.append(f"corpus {domain!r}: {path} is {st.st_size:,} bytes, was {rec['bytes']:,}")
        elif st.st_mtime_ns != rec["mtime_ns"]:
            if rec.get("sha256") is None:
                out.append(f"corpus {domain!r}: {path} was modified (too big to compare by content)")
            elif sha256_file(Path(path)) != rec["sha256"]:
                out.append(f"corpus {domain!r}: {path} has other content (same size)")
    return out


def corpus_changes(recorded: dict, corpora) -> list[str]:
    """What differs between the recorded fingerprint and the sources now (empty: unchanged)."""
    out = []
    for c in corpora:
        rec = recorded.get(c.domain)
        if rec is None:
            out.append(f"corpus {c.domain!r} has no recorded fingerprint")
            continue
        try:
            files = _source_files(c.source)
        except FlowrayError as exc:  # a file gone or a glob that matches nothing now
            out.append(f"corpus {c.domain!r}: {exc}")
            continue
        out += _file_changes(c.domain, rec.get("files", []), files)
        if rec.get("interpreter") != _interpreter(c.source):
            out.append(f"corpus {c.domain!r}: read from {_interpreter(c.source)}, prepared from {rec.get('interpreter')}")
    return out


# --- shards -------------------------------------------------------------------------------------------
def shard_identity(content_hash: str, texts_per_shard: int, shard_id: str, data: bytes) -> dict:
    """What a shard's outputs are bound to: the config's content, the shard layout, the input file's bytes."""
    return {"content_hash": content_hash, "texts_per_shard": texts_per_shard,
            "input": {"path": f"shards/{shard_id}.parquet", "bytes": len(data), "sha256": sha256_bytes(data)}}


def identity_mismatch(recorded, expected: dict) -> str | None:
    """None when a marker's identity is the expected one; else what differs."""
    if not isinstance(recorded, dict):
        return "it records no run identity (written by an older flowray)"
    if recorded.get("texts_per_shard") != expected["texts_per_shard"]:
        return (f"it belongs to another shard layout (texts_per_shard {recorded.get('texts_per_shard')}, this "
                f"run {expected['texts_per_shard']})")
    if recorded.get("content_hash") != expected["content_hash"]:
        return (f"it was committed by a run of another config (content hash {recorded.get('content_hash')}, "
                f"this run {expected['content_hash']})")
    got, want = recorded.get("input") or {}, expected["input"]
    if got.get("sha256") != want["sha256"] or got.get("bytes") != want["bytes"]:
        return (f"it was computed from another {want['path']} ({got.get('bytes')} bytes, sha256 "
                f"{str(got.get('sha256'))[:12]}; now {want['bytes']} bytes, {want['sha256'][:12]})")
    return None
