"""Prepare step: corpora -> deterministic Parquet shards (``shard_id`` / ``doc_id``) + ``shards/index.json``.

Runs on the driver before any actor starts, so a bad corpus (missing field, empty source) fails here.
The index records the config's content, the corpus's fingerprint (``flowray.pipeline.identity``) and each
shard file's size and sha256. Re-running the same config finds the index and reuses the shards after
checking them: a corpus edited since is refused, a damaged shard file is prepared again from the corpus.
A different config on the same run directory is refused (resuming it would mix two experiments).
"""

from __future__ import annotations

import io
import json
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq

from flowray.config import JobConfig
from flowray.errors import ConfigError
from flowray.pipeline.identity import config_changes, corpus_changes, corpus_fingerprint, sha256_bytes, shard_identity
from flowray.pipeline.storage import Storage, StorageError
from flowray.tables import SHARD_INPUT

log = logging.getLogger(__name__)
INDEX = "shards/index.json"
INDEX_VERSION = 2  # 1: no corpus fingerprint, no shard checksums
RESTART = "use a new run_name, or --restart to discard this run and prepare it again"


def shard_id(domain: str, number: int) -> str:
    return f"{domain}-{number:05d}"


def _other_experiment(storage: Storage, config: JobConfig, what: str, old: dict | None, got_hash) -> ConfigError:
    changes = config_changes(old, config.content()) if isinstance(old, dict) else []
    differs = f": {'; '.join(changes[:6])}" if changes else f" (hash {got_hash} vs {config.content_hash()})"
    return ConfigError(f"run directory {storage.uri} already holds a run with a different config{differs} ({what}); "
                       "resuming would mix experiments: choose another run_name, or --restart to discard that run")


def _existing_index(config: JobConfig, storage: Storage) -> dict | None:
    """The index of a run already in ``storage`` (None if none); ConfigError if it is another experiment."""
    if not storage.exists(INDEX):
        return None
    try:
        index = storage.read_json(INDEX)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{storage.path(INDEX)} is not valid JSON ({exc}); the run directory is damaged: "
                          f"{RESTART}") from None
    if not isinstance(index, dict) or index.get("content_hash") != config.content_hash():
        got = index.get("content_hash") if isinstance(index, dict) else None
        raise _other_experiment(storage, config, INDEX, index.get("config") if isinstance(index, dict) else None, got)
    if index.get("index_version") != INDEX_VERSION:
        raise ConfigError(f"{storage.path(INDEX)} was written by an older flowray (no corpus fingerprint or shard "
                          f"checksums); {RESTART}")
    return index


def check_same_experiment(config: JobConfig, storage: Storage) -> None:
    """ConfigError when the run directory holds another config's run: its index, else its config.json,
    else (both lost) the identity its commit markers record."""
    if _existing_index(config, storage) is not None:
        return
    if storage.exists("config.json"):
        old = storage.read_json("config.json")
        old_content = {k: old.get(k) for k in config.content()} if isinstance(old, dict) else None
        if old_content != config.content():
            raise _other_experiment(storage, config, "config.json", old_content, None)
        return
    for name in storage.list("done", ".json"):
        try:
            recorded = (storage.read_json(f"done/{name}").get("identity") or {}).get("content_hash")
        except (ValueError, UnicodeDecodeError, AttributeError):
            continue  # a damaged marker is redone, not a sign of another experiment
        if recorded is not None and recorded != config.content_hash():
            raise _other_experiment(storage, config, f"done/{name}", None, recorded)


def check_writable(config: JobConfig, storage: Storage) -> None:
    """The run directory can be written (a probe file, removed at once)."""
    probe = f".write-check-{os.getpid()}"
    try:
        storage.write_bytes(probe, b"")
        storage.delete(probe)
    except (OSError, pa.ArrowException, StorageError) as exc:
        raise ConfigError(
            f"output: cannot write the run directory {storage.uri!r} ({type(exc).__name__}: {exc}); set "
            "output to a writable local folder or a bucket URI (s3://..., gs://...)") from None


def check_run_directory(config: JobConfig, storage: Storage) -> None:
    """Before any work: the run directory holds no other experiment's run, and can be written."""
    check_same_experiment(config, storage)
    check_writable(config, storage)


def _check_texts(domain: str, docs) -> None:
    """A corpus whose every text is empty would run the model for nothing and leave no prediction."""
    if all(not isinstance(d.text, str) or not d.text.strip() for d in docs):
        raise ConfigError(
            f"corpus {domain!r}: all {len(docs)} texts are empty or only whitespace (first: "
            f"{docs[0].text!r}); check its text_field / source (every domain needs at least one text)")


def _domain_shards(config: JobConfig, corpus, tokenizer) -> list[tuple[str, list[str], bytes]]:
    """``(shard_id, doc_ids, parquet bytes)`` of every shard of one domain, in order."""
    from flowray.corpora import iter_documents

    docs = list(iter_documents(corpus.source, limit=config.texts_for(corpus), seed=config.seed, tokenizer=tokenizer))
    if not docs:
        raise ConfigError(
            f"corpus {corpus.domain!r} yielded no documents from {json.dumps(corpus.source)}; check its "
            "paths/split/filters (every domain needs at least one text)"
        )
    _check_texts(corpus.domain, docs)
    ids = [d.doc_id for d in docs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"corpus {corpus.domain!r} produced the doc_id {dup!r} twice; doc ids must be unique")
    out = []
    for number, start in enumerate(range(0, len(docs), config.texts_per_shard)):
        part = docs[start : start + config.texts_per_shard]
        sid = shard_id(corpus.domain, number)
        table = pa.table({
            "shard_id": [sid] * len(part),
            "doc_id": [d.doc_id for d in part],
            "domain": [corpus.domain] * len(part),
            "language": [corpus.language] * len(part),
            "is_task": [corpus.is_task] * len(part),
            "text": [d.text for d in part],
            "meta": [json.dumps(d.meta, sort_keys=True, default=str) for d in part],
        }, schema=SHARD_INPUT)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        out.append((sid, [d.doc_id for d in part], buf.getvalue()))
    return out


def _shard_entry(config: JobConfig, domain: str, sid: str, doc_ids: list[str], data: bytes) -> dict:
    return {"shard_id": sid, "domain": domain, "texts": len(doc_ids), "doc_ids": doc_ids,
            "identity": shard_identity(config.content_hash(), config.texts_per_shard, sid, data)}


def _damaged_inputs(storage: Storage, index: dict) -> dict[str, str]:
    """shard id -> why its prepared file no longer matches the index (missing, resized, rewritten)."""
    damaged = {}
    for shard in index["shards"]:
        spec = shard["identity"]["input"]
        if not storage.exists(spec["path"]):
            damaged[shard["shard_id"]] = f"{spec['path']} is missing"
            continue
        data = storage.read_bytes(spec["path"])
        if len(data) != spec["bytes"]:
            damaged[shard["shard_id"]] = f"{spec['path']} is {len(data)} bytes, the index says {spec['bytes']}"
        elif sha256_bytes(data) != spec["sha256"]:
            damaged[shard["shard_id"]] = f"{spec['path']} does not match its sha256 in the index"
    return damaged


def _prepare_again(config: JobConfig, storage: Storage, index: dict, damaged: dict[str, str], tokenizer) -> None:
    """Write the damaged shard files again from the (unchanged) corpus; the index follows their bytes."""
    entries = {s["shard_id"]: s for s in index["shards"]}
    for corpus in config.corpora:
        if not any(entries[sid]["domain"] == corpus.domain for sid in damaged):
            continue
        for sid, doc_ids, data in _domain_shards(config, corpus, tokenizer):
            if sid not in damaged:
                continue
            if doc_ids != entries[sid]["doc_ids"]:  # the fingerprint matched, so this is not expected
                raise ConfigError(f"shard {sid} prepared again holds other texts than planned; {RESTART}")
            log.warning("prepared shard %s again: %s", sid, damaged[sid])
            storage.write_bytes(f"shards/{sid}.parquet", data)
            entries[sid]["identity"] = shard_identity(config.content_hash(), config.texts_per_shard, sid, data)
    storage.write_json(INDEX, index)


def prepare(config: JobConfig, storage: Storage, tokenizer) -> dict:
    """Write (or find and check) the shards of ``config`` under ``storage``; return the index."""
    index = _existing_index(config, storage)
    if index is not None:
        changes = corpus_changes(index["corpus"], config.corpora)
        if changes:
            raise ConfigError(f"the corpus changed since this run was prepared ({'; '.join(changes[:5])}); {RESTART}")
        damaged = _damaged_inputs(storage, index)
        if damaged:
            _prepare_again(config, storage, index, damaged, tokenizer)
        log.info("resuming: %d shards already prepared in %s", len(index["shards"]), storage.uri)
        return index
    fingerprint = corpus_fingerprint(config.corpora)  # taken before the files are read
    shards, domains = [], {}
    for corpus in config.corpora:
        parts = _domain_shards(config, corpus, tokenizer)
        for sid, doc_ids, data in parts:
            storage.write_bytes(f"shards/{sid}.parquet", data)
            shards.append(_shard_entry(config, corpus.domain, sid, doc_ids, data))
        domains[corpus.domain] = sum(len(doc_ids) for _, doc_ids, _ in parts)
        log.info("prepared %-26s %5d texts in %d shards", corpus.domain, domains[corpus.domain], len(parts))
    index = {"index_version": INDEX_VERSION, "content_hash": config.content_hash(), "config": config.content(),
             "corpus": fingerprint, "domains": domains, "shards": shards, "texts": sum(domains.values())}
    storage.write_json(INDEX, index)  # written last: its presence means every shard file is there
    return index
