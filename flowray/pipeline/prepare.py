"""Prepare step: corpora -> deterministic Parquet shards (``shard_id`` / ``doc_id``) + ``shards/index.json``.

Runs on the driver before any actor starts, so a bad corpus (missing field, empty source) fails here.
Re-running the same config finds the index and reuses the shards; a different config on the same run
directory is refused (resuming it would mix two experiments).
"""

from __future__ import annotations

import json
import logging
import os

import pyarrow as pa

from flowray.config import JobConfig
from flowray.errors import ConfigError
from flowray.pipeline.storage import Storage
from flowray.tables import SHARD_INPUT

log = logging.getLogger(__name__)
INDEX = "shards/index.json"


def shard_id(domain: str, number: int) -> str:
    return f"{domain}-{number:05d}"


def _existing_index(config: JobConfig, storage: Storage) -> dict | None:
    """The index of a run already in ``storage`` (None if none); ConfigError if it is another experiment."""
    if not storage.exists(INDEX):
        return None
    try:
        index = storage.read_json(INDEX)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{storage.path(INDEX)} is not valid JSON ({exc}); the run directory is damaged: "
                          "delete it (or choose another run_name) and run again") from None
    if not isinstance(index, dict) or index.get("content_hash") != config.content_hash():
        got = index.get("content_hash") if isinstance(index, dict) else None
        raise ConfigError(
            f"run directory {storage.uri} already holds a run with a different config (hash "
            f"{got} vs {config.content_hash()}); resuming would mix experiments: "
            "choose another run_name or delete that directory"
        )
    return index


def check_run_directory(config: JobConfig, storage: Storage) -> None:
    """Before any work: the run directory can be written, and holds no other experiment's run."""
    _existing_index(config, storage)
    probe = f".write-check-{os.getpid()}"
    try:
        storage.write_bytes(probe, b"")
        storage.delete(probe)
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(
            f"output: cannot write the run directory {storage.uri!r} ({type(exc).__name__}: {exc}); set "
            "output to a writable local folder or a bucket URI (s3://..., gs://...)") from None


def _check_texts(domain: str, docs) -> None:
    """A corpus whose every text is empty would run the model for nothing and leave no prediction."""
    if all(not isinstance(d.text, str) or not d.text.strip() for d in docs):
        raise ConfigError(
            f"corpus {domain!r}: all {len(docs)} texts are empty or only whitespace (first: "
            f"{docs[0].text!r}); check its text_field / source (every domain needs at least one text)")


def prepare(config: JobConfig, storage: Storage, tokenizer) -> dict:
    """Write (or find) the shards of ``config`` under ``storage``; return the index."""
    index = _existing_index(config, storage)
    if index is not None:
        log.info("resuming: %d shards already prepared in %s", len(index["shards"]), storage.uri)
        return index
    from flowray.corpora import iter_documents

    shards, domains = [], {}
    for corpus in config.corpora:
        docs = list(iter_documents(corpus.source, limit=config.texts_for(corpus), seed=config.seed,
                                   tokenizer=tokenizer))
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
        domains[corpus.domain] = len(docs)
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
            storage.write_table(f"shards/{sid}.parquet", table)
            shards.append({"shard_id": sid, "domain": corpus.domain, "texts": len(part), "doc_ids": ids[start : start + len(part)]})
        log.info("prepared %-26s %5d texts in %d shards", corpus.domain, len(docs), -(-len(docs) // config.texts_per_shard))
    index = {"content_hash": config.content_hash(), "domains": domains, "shards": shards,
             "texts": sum(domains.values())}
    storage.write_json(INDEX, index)  # written last: its presence means every shard file is there
    return index
