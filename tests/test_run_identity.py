"""A run is bound to its config, its corpus and its prepared shards: markers, resumes and readers.

No Ray and no model: a JSONL corpus is prepared for real, and each shard is committed with synthetic
prediction tables exactly as a worker commits them (``read_shard_input`` then ``commit_shard``).
"""

from __future__ import annotations

import json
import os
import sys

import pyarrow as pa
import pytest

from flowray.config import JobConfig
from flowray.errors import ConfigError
from flowray.pipeline.commit import (
    commit_shard,
    pending_shards,
    read_shard_input,
    remove_unplanned,
    verify_shard,
)
from flowray.pipeline.prepare import INDEX, check_same_experiment, prepare
from flowray.pipeline.reduce import IncompleteRunError, reduce_run
from flowray.pipeline.storage import Storage
from flowray.tables import ERRORS, predictions_schema

TAU = 0.03


def _config(tmp_path, **extra) -> JobConfig:
    path = tmp_path / "notes.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps({"body": f"note {i}: a fox and {i} dogs"}) + "\n" for i in range(6)))
    return JobConfig.from_dict({
        "run_name": "r", "output": str(tmp_path / "runs"), "tau": [TAU], "texts_per_domain": 6,
        "texts_per_shard": 2, "max_tokens": 6,
        "corpora": [{"domain": "notes", "source": {"kind": "jsonl", "paths": [str(path)], "text_field": "body"}}],
        **extra})


def _predictions(docs: list[dict], T: int = 3) -> pa.Table:
    rows = [{"domain": d["domain"], "shard_id": d["shard_id"], "doc_id": d["doc_id"], "position": p, "n_tokens": T,
             "token_id": p, "token": "x", "next_token_id": None, "next_token": None, "predicted_id": 0,
             "predicted_token": "x", "word_index": p, "first_subword": True, "pos": "NOUN", "next_pos": None,
             "target": True, "component_importance": [0.2, 0.1, 0.5], "prev_token_share": [0.9, 0.1],
             "same_word_share": [0.0, 0.0], f"route_heads@{TAU:g}": [0], f"route_ffn@{TAU:g}": [0], "bos": False,
             f"pruned_heads@{TAU:g}": [0, 1]} for d in docs for p in range(T)]
    return pa.Table.from_pylist(rows, schema=predictions_schema((TAU,)))


def _commit_all(storage: Storage, config: JobConfig, index: dict) -> None:
    """Every shard of the plan committed as a worker would (identity from the input bytes it read)."""
    for shard in index["shards"]:
        sid = shard["shard_id"]
        docs, identity = read_shard_input(storage, sid, config.content_hash(), config.texts_per_shard)
        preds, errors = _predictions(docs), ERRORS.empty_table()
        summary = {"shard_id": sid, "texts": len(docs), "predictions": preds.num_rows, "errors": 0, "seconds": 0.0,
                   "worker": "test", "n_layers": 1, "n_heads": 2, "pos_tagging": True}
        commit_shard(storage, sid, preds, errors, summary, identity)


@pytest.fixture
def run(tmp_path):
    """A prepared and fully committed run of ``_config``: (config, storage, index)."""
    config = _config(tmp_path)
    storage = Storage(f"{config.output}/{config.run_name}")
    index = prepare(config, storage, tokenizer=None)
    storage.write_json("config.json", config.to_dict())  # as run_job does after prepare
    _commit_all(storage, config, index)
    assert pending_shards(storage, index["shards"]) == ([], [])
    return config, storage, index


def _plan_for(config: JobConfig, index: dict) -> list[dict]:
    """The same shards as another config would plan them (its content hash in every identity)."""
    return [{**s, "identity": {**s["identity"], "content_hash": config.content_hash()}} for s in index["shards"]]


def test_a_marker_counts_only_for_the_config_and_input_it_was_made_from(run, tmp_path):
    config, storage, index = run
    other = _config(tmp_path, max_tokens=16)
    plan = _plan_for(other, index)
    assert "another config" in verify_shard(storage, "notes-00000", plan[0]["doc_ids"], plan[0]["identity"])
    assert pending_shards(storage, plan)[0] == ["notes-00000", "notes-00001", "notes-00002"]
    assert not storage.list("done"), "markers of another config are withdrawn before the redo"
    # the reduce never reads a shard whose marker is bound to another config
    _commit_all(storage, config, index)
    index_other = {**index, "shards": plan, "content_hash": other.content_hash()}
    with pytest.raises(IncompleteRunError, match="another config"):
        reduce_run(other, storage, index_other, started=0.0)
    # nor one computed from another input file (a shard prepared again since)
    moved = [{**s, "identity": {**s["identity"], "input": {**s["identity"]["input"], "sha256": "0" * 64}}}
             for s in index["shards"]]
    assert "computed from another shards/notes-00001.parquet" in verify_shard(storage, "notes-00001",
                                                                             identity=moved[1]["identity"])
    # a marker without an identity (an older flowray) is redone
    marker = storage.read_json("done/notes-00002.json")
    storage.write_json("done/notes-00002.json", {k: v for k, v in marker.items() if k != "identity"})
    assert "records no run identity" in verify_shard(storage, "notes-00002", identity=index["shards"][2]["identity"])


def test_another_configs_run_is_refused_naming_what_differs_even_without_its_index(run, tmp_path):
    config, storage, _ = run
    other = _config(tmp_path, max_tokens=16)
    storage.delete(INDEX)
    with pytest.raises(ConfigError, match=r"different config: max_tokens: 6 -> 16 \(config.json\)"):
        check_same_experiment(other, storage)
    storage.delete("config.json")  # the commit markers still say which config made them
    with pytest.raises(ConfigError, match=r"different config \(hash \w+ vs \w+\) \(done/notes-00000.json\)"):
        check_same_experiment(other, storage)
    check_same_experiment(config, storage)  # the same config resumes


def test_an_edited_corpus_is_refused_and_a_touched_one_resumes(run, tmp_path):
    config, storage, index = run
    path = tmp_path / "notes.jsonl"
    assert index["corpus"]["notes"]["files"][0]["sha256"] and index["shards"][0]["identity"]["input"]["sha256"]
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # touched, same content
    assert prepare(config, storage, tokenizer=None)["shards"] == index["shards"]
    text = path.read_text()
    path.write_text(text.replace("note 1:", "NOTE 1:"))  # same size, other content
    with pytest.raises(ConfigError, match=r"the corpus changed since this run was prepared \(corpus 'notes': "
                       r".*notes.jsonl has other content \(same size\)\); use a new run_name, or --restart"):
        prepare(config, storage, tokenizer=None)
    path.write_text(text + json.dumps({"body": "one more"}) + "\n")
    with pytest.raises(ConfigError, match=r"notes.jsonl is \d+ bytes, was \d+"):
        prepare(config, storage, tokenizer=None)


def test_a_damaged_prepared_shard_is_prepared_again(run):
    config, storage, index = run
    good = {s["shard_id"]: storage.read_bytes(f"shards/{s['shard_id']}.parquet") for s in index["shards"]}
    storage.write_bytes("shards/notes-00001.parquet", good["notes-00001"][:100])  # truncated
    storage.write_bytes("shards/notes-00002.parquet", good["notes-00000"])  # replaced by another shard
    again = prepare(config, storage, tokenizer=None)
    assert again["shards"] == index["shards"]
    assert {sid: storage.read_bytes(f"shards/{sid}.parquet") for sid in good} == good
    assert pending_shards(storage, again["shards"]) == ([], []), "same input again: the commits still hold"


def test_only_the_files_committed_markers_list_are_read(run, tmp_path):
    """Outputs of an older shard layout (no marker) are neither reduced nor read by the notebooks."""
    config, storage, index = run
    orphan = _predictions([{"domain": "notes", "shard_id": "notes-00005", "doc_id": "notes.jsonl:000005"}])
    storage.write_table("predictions/notes-00005.parquet", orphan)  # texts_per_shard 1 left this behind
    manifest = reduce_run(config, storage, index, started=0.0)
    assert manifest["counts"]["predictions_written"] == 6 * 3 and manifest["every_text_exactly_once"]
    assert manifest["outputs"]["predictions"] == [f"predictions/notes-0000{i}.parquet" for i in range(3)]
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "analysis"))
    import common  # analysis/common.py: what every notebook reads a run with

    lazy = common.open_run(storage.uri).predictions()
    assert lazy.collect().height == manifest["counts"]["predictions_written"]
    assert remove_unplanned(storage, index["shards"]) == ["predictions/notes-00005.parquet"]
    assert sorted(storage.list("predictions")) == [f"notes-0000{i}.parquet" for i in range(3)]


def test_restart_discards_the_run_but_not_its_lease(run, tmp_path):
    from flowray.pipeline.job import discard_run
    from flowray.pipeline.lock import LOCK, RunLock

    config, storage, index = run
    reduce_run(config, storage, index, started=0.0)
    other = _config(tmp_path, max_tokens=16)
    with RunLock(storage):
        discard_run(storage)
        assert storage.list("") == [LOCK] and not storage.list("done") and not storage.list("predictions")
        check_same_experiment(other, storage)  # nothing of the old run is left to mix with
        assert prepare(other, storage, tokenizer=None)["content_hash"] == other.content_hash()
