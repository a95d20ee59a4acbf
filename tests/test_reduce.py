"""Commit markers that prove their files, the reduce's exactly-once check from the tables, the manifest.

No Ray and no model: prediction tables are synthetic (1 layer, 2 heads), committed with ``commit_shard``
exactly as the worker commits them, then damaged or made wrong on purpose.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from flowray.config import CorpusConfig, JobConfig
from flowray.errors import ConfigError
from flowray.pipeline.commit import commit_shard, load_shard, pending_shards, verify_shard
from flowray.pipeline.reduce import EmptyDomainError, IncompleteRunError, exactly_once, reduce_run
from flowray.pipeline.storage import Storage, StorageError
from flowray.run_report import write_report
from flowray.tables import ERRORS, predictions_schema, tau_columns

TAU = (0.03,)
DOMAINS = ("gen", "code")


def _config(**extra) -> JobConfig:
    corpora = tuple(CorpusConfig(domain=d, source={"kind": "pydoc_topics", "max_chars": None}) for d in DOMAINS)
    return JobConfig(corpora=corpora, tau=TAU, run_name="r", **extra)


def _predictions(domain: str, shard_id: str, docs: list[str], T: int = 3) -> pa.Table:
    rows, cols = [], tau_columns(TAU[0])
    for doc in docs:
        for p in range(T):
            rows.append({
                "domain": domain, "shard_id": shard_id, "doc_id": doc, "position": p, "n_tokens": T,
                "token_id": p, "token": "x", "next_token_id": None, "next_token": None, "predicted_id": 0,
                "predicted_token": "x", "word_index": p, "first_subword": True, "pos": "NOUN", "next_pos": None,
                "target": True, "component_importance": [0.2, 0.1 if domain == "gen" else 0.4, 0.5],
                "prev_token_share": [0.9, 0.1], "same_word_share": [0.0, 0.0],
                "bos": False, cols.route_heads: [0], cols.route_ffn: [0], cols.pruned_heads: [0, 1],
            })
    return pa.Table.from_pylist(rows, schema=predictions_schema(TAU))


def _errors(domain: str, shard_id: str, docs: list[str]) -> pa.Table:
    return pa.Table.from_pylist([{"domain": domain, "shard_id": shard_id, "doc_id": d, "error_type": "InputError",
                                  "error": "text is empty or only whitespace", "traceback": None, "n_chars": 0}
                                 for d in docs], schema=ERRORS)


def _summary(shard_id, preds, errors):
    return {"shard_id": shard_id, "texts": 0, "predictions": preds.num_rows, "errors": errors.num_rows,
            "seconds": 0.0, "worker": "test", "n_layers": 1, "n_heads": 2, "pos_tagging": True}


def _plan() -> dict:
    """Two shards per domain, two texts per shard; each shard's second text of shard 1 is an error row."""
    shards = []
    for domain in DOMAINS:
        for n in range(2):
            shards.append({"shard_id": f"{domain}-{n:05d}", "domain": domain, "texts": 2,
                           "doc_ids": [f"{domain}:{2 * n}", f"{domain}:{2 * n + 1}"]})
    return {"content_hash": _config().content_hash(), "domains": {d: 4 for d in DOMAINS}, "shards": shards,
            "texts": 8}


def _commit(storage, shard, predicted=None, failed=None):
    """Commit ``shard`` as the worker would: by default its last doc of shard 1 failed, the rest predicted."""
    sid, domain, docs = shard["shard_id"], shard["domain"], shard["doc_ids"]
    if predicted is None:
        failed = docs[1:] if sid.endswith("1") else []
        predicted = [d for d in docs if d not in failed]
    preds, errors = _predictions(domain, sid, predicted), _errors(domain, sid, failed or [])
    return commit_shard(storage, sid, preds, errors, _summary(sid, preds, errors))


@pytest.fixture
def run(tmp_path):
    storage, index = Storage(str(tmp_path / "run")), _plan()
    for shard in index["shards"]:
        _commit(storage, shard)
    return storage, index


def _reduce(storage, index, config=None):
    return reduce_run(config or _config(), storage, index, started=0.0)


def test_a_complete_run_reduces_and_its_flag_comes_from_the_tables(run, tmp_path):
    storage, index = run
    manifest = _reduce(storage, index)
    assert manifest["every_text_exactly_once"] is True
    assert manifest["exactly_once"] == {"texts_planned": 8, "texts_found": 8}
    assert manifest["shards_verified"] == 4 and manifest["counts"]["error_rows"] == 2
    assert manifest["counts"]["predictions_written"] == 6 * 3
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["every_text_exactly_once"] is True


def test_a_marker_records_sizes_checksums_rows_and_doc_ids(run, tmp_path):
    storage, index = run
    marker = json.loads((tmp_path / "run" / "done" / "gen-00001.json").read_text())
    spec = marker["files"]["predictions"]
    assert spec["bytes"] == (tmp_path / "run" / "predictions" / "gen-00001.parquet").stat().st_size
    assert len(spec["sha256"]) == 64 and spec["rows"] == 3 and spec["doc_ids"] == ["gen:2"]
    assert marker["files"]["errors"]["doc_ids"] == ["gen:3"]
    assert verify_shard(storage, "gen-00001", index["shards"][1]["doc_ids"]) is None


@pytest.mark.parametrize("what", ["missing", "in_two_shards", "predicted_and_failed", "two_error_rows",
                                  "repeated_positions"])
def test_a_text_missing_or_twice_in_the_tables_fails_the_reduce(run, what):
    """The plan still lists every text once: only the doc ids in the tables can fail these."""
    storage, index = run
    gen0, gen1 = index["shards"][0], index["shards"][1]
    sid = gen0["shard_id"]
    if what == "missing":  # a text dropped by the worker: in neither table
        _commit(storage, gen0, predicted=["gen:0"], failed=[])
    elif what == "in_two_shards":  # gen:0 predicted again by another shard
        _commit(storage, gen1, predicted=["gen:2", "gen:0"], failed=["gen:3"])
    elif what == "predicted_and_failed":
        _commit(storage, gen0, predicted=["gen:0", "gen:1"], failed=["gen:1"])
    elif what == "two_error_rows":
        _commit(storage, gen0, predicted=["gen:0"], failed=["gen:1", "gen:1"])
    else:  # every prediction row of gen:0 written twice
        preds = _predictions("gen", sid, ["gen:0", "gen:1"])
        preds = pa.concat_tables([preds, preds.filter(pc.equal(preds.column("doc_id"), "gen:0"))])
        errors = _errors("gen", sid, [])
        commit_shard(storage, sid, preds, errors, _summary(sid, preds, errors))
    with pytest.raises(IncompleteRunError, match="not each present exactly once"):
        _reduce(storage, index)
    assert not storage.exists("manifest.json")


def test_exactly_once_reports_what_is_wrong(run):
    storage, index = run
    loaded = [(s["domain"], *load_shard(storage, s["shard_id"])[1:]) for s in index["shards"]]
    assert exactly_once(index, loaded)["missing"] == []
    check = exactly_once(index, loaded[1:])  # gen-00000's outputs lost
    assert check["missing"] == ["gen/gen:0", "gen/gen:1"] and check["texts_found"] == 6
    check = exactly_once(index, loaded + loaded[:1])
    assert check["duplicated"] == ["gen/gen:0", "gen/gen:1"]


def _flip_byte(path):
    """Same size, one byte changed inside the data pages (a bit rot, or a rewrite of the same length)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage, reason", [
    (lambda run: _truncate(run / "predictions" / "code-00001.parquet"), "bytes, the marker says"),
    (lambda run: (run / "predictions" / "code-00001.parquet").unlink(), "is missing"),
    (lambda run: _flip_byte(run / "predictions" / "code-00001.parquet"), "sha256"),
    (lambda run: _truncate(run / "done" / "code-00001.json"), "not valid JSON"),
    (lambda run: (run / "errors" / "code-00001.parquet").write_bytes(
        (run / "errors" / "code-00000.parquet").read_bytes()), "bytes, the marker says|sha256"),
    (lambda run: (run / "done" / "code-00001.json").write_text('{"shard_id": "code-00001"}'), "version-2 marker"),
])
def test_a_damaged_commit_is_caught_the_manifest_withdrawn_and_the_shard_redone(run, tmp_path, damage, reason):
    storage, index = run
    _reduce(storage, index)
    assert storage.exists("manifest.json")
    damage(tmp_path / "run")
    assert reason.split("|")[0] in (verify_shard(storage, "code-00001") or "") or \
        reason.split("|")[-1] in (verify_shard(storage, "code-00001") or "")
    with pytest.raises(IncompleteRunError, match=f"code-00001: .*({reason})"):
        _reduce(storage, index)
    assert not storage.exists("manifest.json"), "a manifest must not outlive the files it describes"
    pending, redone = pending_shards(storage, index["shards"])
    assert pending == redone == ["code-00001"]
    assert not storage.exists("done/code-00001.json"), "the stale marker is removed before the redo"
    _commit(storage, index["shards"][3])  # the redo
    assert pending_shards(storage, index["shards"]) == ([], [])
    assert _reduce(storage, index)["every_text_exactly_once"] is True


def test_pending_shards_checks_the_plan_too(run):
    storage, index = run
    _commit(storage, index["shards"][0], predicted=["gen:0"], failed=[])  # gen:1 dropped
    assert "missing ['gen:1']" in verify_shard(storage, "gen-00000", index["shards"][0]["doc_ids"])
    assert pending_shards(storage, index["shards"])[0] == ["gen-00000"]


def test_a_general_domain_whose_every_text_failed_is_refused(run):
    storage, index = run
    for shard in index["shards"][:2]:
        _commit(storage, shard, predicted=[], failed=shard["doc_ids"])
    with pytest.raises(EmptyDomainError, match="general domain 'gen': all 4 texts failed .*InputError"):
        _reduce(storage, index)
    assert not storage.exists("manifest.json")


def test_another_domain_whose_every_text_failed_is_stated(run, tmp_path):
    storage, index = run
    for shard in index["shards"][2:]:
        _commit(storage, shard, predicted=[], failed=shard["doc_ids"])
    manifest = _reduce(storage, index)
    assert manifest["domains_without_predictions"] == ["code"]
    write_report(storage)
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "| code | 4 | 0 | 0 | 4 (every text failed" in summary


def test_the_run_directory_is_checked_before_any_work(tmp_path):
    from flowray.pipeline.prepare import check_run_directory

    with pytest.raises(ConfigError, match="cannot write the run directory '/proc/x/r'"):
        check_run_directory(_config(), Storage("/proc/x/r"))
    storage = Storage(str(tmp_path / "other"))
    storage.write_json("shards/index.json", {"content_hash": "0123"})
    storage.write_json("manifest.json", {"every_text_exactly_once": True})
    with pytest.raises(ConfigError, match="different config"):
        check_run_directory(_config(), storage)
    assert storage.exists("manifest.json"), "another experiment's manifest is left alone"
    check_run_directory(_config(), Storage(str(tmp_path / "new" / "deeper")))
    assert not list((tmp_path / "new" / "deeper").iterdir())  # the probe file is gone


def test_a_corpus_of_only_empty_texts_stops_at_prepare(tmp_path):
    from flowray.pipeline.prepare import prepare

    path = tmp_path / "empty.jsonl"
    path.write_text('{"text": ""}\n{"text": "   "}\n{"text": null}\n{"text": "\\n\\n"}\n')
    corpus = CorpusConfig(domain="e", source={"kind": "jsonl", "paths": [str(path)], "text_field": "text",
                                              "meta_fields": [], "base_dir": None, "max_chars": None,
                                              "skip_bad_lines": False})
    with pytest.raises(ConfigError, match="corpus 'e': all 4 texts are empty"):
        prepare(JobConfig(corpora=(corpus,)), Storage(str(tmp_path / "run")), tokenizer=None)


def test_a_failed_reduce_withdraws_every_derived_file(run, tmp_path):
    storage, index = run
    _reduce(storage, index)
    write_report(storage)  # what the job does after a reduce
    derived = ["manifest.json", "summary.md", "report.html", "tables/head_roles.parquet",
               "figures/activation_map.png"]
    assert all(storage.exists(rel) for rel in derived)
    _truncate(tmp_path / "run" / "predictions" / "code-00001.parquet")
    with pytest.raises(IncompleteRunError):
        _reduce(storage, index)
    assert [rel for rel in derived if storage.exists(rel)] == [], "old tables and figures beside new data"


class _FullDisk:
    """A local file system whose writes under ``tables/`` fail as a full disk does, after some bytes."""

    def __init__(self, fs):
        self.fs = fs

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def open_output_stream(self, path, *args, **kwargs):
        stream = self.fs.open_output_stream(path, *args, **kwargs)
        if "/tables/" not in path:
            return stream

        class Full:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                stream.close()

            def write(self, data):
                stream.write(data[:10])
                raise OSError(28, "No space left on device")

        return Full()


def test_a_full_disk_mid_reduce_is_one_clear_error_and_leaves_no_temporary_file(run, tmp_path, monkeypatch):
    storage, index = run
    real = Storage._fs
    monkeypatch.setattr(Storage, "_fs", lambda self: (_FullDisk(real(self)[0]), real(self)[1]))
    with pytest.raises(StorageError, match=r"could not write .*/tables/\w+\.parquet: no space left on the device "
                       r"\(disk full\)"):
        _reduce(storage, index)
    monkeypatch.undo()
    assert not storage.exists("manifest.json")
    assert not [p for p in (tmp_path / "run").rglob(".tmp-*")], "a temporary file was left behind"
