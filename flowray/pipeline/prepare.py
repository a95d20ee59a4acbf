"""Prepare step: corpora -> deterministic Parquet shards (``shard_id`` / ``doc_id``) + ``shards/index.json``.

Runs on the driver before any actor starts, so a bad corpus (missing field, empty source) fails here.
Re-running the same config finds the index and reuses the shards; a different config on the same run
directory is refused (resuming it would mix two experiments).
"""

from __future__ import annotations

import json
import logging

import pyarrow as pa

from flowray.config import JobConfig
from flowray.errors import ConfigError
from flowray.pipeline.storage import Storage
from flowray.tables import SHARD_INPUT

log = logging.getLogger(__name__)
INDEX = "shards/index.json"


def shard_id(domain: str, number: int) -> str:
    return f"{domain}-{number:05d}"


def prepare(config: JobConfig, storage: Storage, tokenizer) -> dict:
    """Write (or find) the shards of ``config`` under ``storage``; return the index."""
    if storage.exists(INDEX):
        index = storage.read_json(INDEX)
        if index.get("content_hash") != config.content_hash():
            raise ConfigError(
                f"run directory {storage.uri} already holds a run with a different config (hash "
                f"{index.get('content_hash')} vs {config.content_hash()}); resuming would mix experiments: "
                "choose another run_name or delete that directory"
            )
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
