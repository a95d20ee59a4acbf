"""The worker's pipeline: device batches beside host work, the same rows as a plain serial computation,
route key rows, and the Parquet layout of committed files."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flowray.config import CorpusConfig, JobConfig

TAUS = (0.02, 0.05)
PROSE = ("The quick brown fox jumps over the lazy dog while the farmer, who had seen it all before, "
         "went on reading his newspaper. It wasn't news to him: foxes had done that since 1999.")


def _config(model_dir, **kw) -> JobConfig:
    return JobConfig(corpora=(CorpusConfig(domain="d", source={"kind": "pydoc_topics"}),), model=str(model_dir),
                     tau=TAUS, **kw)


def _doc(i, text, language="en"):
    return {"shard_id": "d-00000", "doc_id": f"d{i}", "domain": "d", "language": language, "is_task": False,
            "text": text, "meta": "{}"}


def _docs():
    import pydoc_data.topics

    topics = [t for _, t in sorted(pydoc_data.topics.topics.items())][:5]
    texts = [PROSE, "A short one.", *topics, "Привет мир, как дела? " * 8, "def f(x):\n    return x  # cut\n" * 6,
             PROSE[:40]]
    return [_doc(i, t, "ru" if t.startswith("Привет") else "en") for i, t in enumerate(texts)]


def _same_columns(a: pa.Table, b: pa.Table) -> list[str]:
    """Names of the columns that differ (floats compared bit for bit, so NaN equals NaN)."""
    assert a.schema.equals(b.schema)
    bad = []
    for name in a.column_names:
        x, y = a.column(name).combine_chunks(), b.column(name).combine_chunks()
        if pa.types.is_list(x.type) and pa.types.is_floating(x.type.value_type):
            same = (x.value_lengths().equals(y.value_lengths()) and x.is_null().equals(y.is_null()) and np.array_equal(
                x.flatten().to_numpy(zero_copy_only=False).view(np.uint32),
                y.flatten().to_numpy(zero_copy_only=False).view(np.uint32)))
        else:
            same = x.equals(y)
        if not same:
            bad.append(name)
    return bad


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    from flowray.pipeline.worker import FlowWorker

    return FlowWorker(_config(tiny_model_dir, max_tokens=20, batch_size=3))


def _serial_reference(worker, docs) -> pa.Table:
    """The rows as the worker made them before it overlapped: the whole text tokenised, every word of it
    tagged by nltk's own tagger, one batch after the other."""
    from flowray.pipeline.worker import _Prepared
    from flowray.text import align_tokens, tag_tokens

    nltk_tagger = worker.pos_tagging._tagger
    to_universal = worker.pos_tagging._to_universal

    def tag_every_word(words):
        return [to_universal.get(t, "X") for _, t in nltk_tagger.tag(list(words))]

    ready = []
    for index, doc in enumerate(docs):
        enc = worker.tokenizer(doc["text"], return_offsets_mapping=True, add_special_tokens=False)
        ids = [worker.bos.token_id, *enc["input_ids"]]
        offsets = [(0, 0), *(tuple(o) for o in enc["offset_mapping"])]
        keep = min(len(ids), worker.config.max_tokens + 1)
        words = align_tokens(doc["text"], offsets[: min(len(ids), keep + 1)])  # every word of the text
        pos = tag_tokens(doc["text"], words, language=doc["language"], tagger=tag_every_word)
        prep = _Prepared(index=index, doc=doc, ids=ids[:keep], next_ids=ids[1 : keep + 1] + [None] * (keep + 1 - len(ids)),
                         words=words, target=[p >= 1 for p in range(keep)], text=doc["text"], language=doc["language"])
        ready.append((prep, pos))
    ready.sort(key=lambda item: len(item[0].ids))
    tables = []
    size = worker.config.batch_size
    for start in range(0, len(ready), size):
        group = ready[start : start + size]
        for (prep, pos), st in zip(group, worker._stats([p for p, _ in group])):
            tables.append((prep.index, worker._rows(prep, st, pos).table(worker.schema)))
    tables.sort(key=lambda item: item[0])
    return pa.concat_tables([t for _, t in tables])


def test_the_overlapped_worker_writes_the_rows_of_a_plain_serial_computation(worker):
    """Cut texts (tokenised and tagged only where kept), Russian (no tags), code, texts that fit: every
    column equal, floats bit for bit, rows in input order."""
    docs = _docs()
    got, errors = worker.process(docs)
    assert errors.num_rows == 0
    assert got.column("doc_id").unique().to_pylist() == [d["doc_id"] for d in docs]  # input order
    assert (got.column("n_tokens").to_numpy() == 21).sum() > 0  # some texts were cut to max_tokens
    assert _same_columns(got, _serial_reference(worker, docs)) == []


class _SleepyStage:
    """The tiny model's device stage, then ``seconds`` of simulated device time per batch."""

    def __init__(self, inner, seconds: float):
        self.inner, self.seconds = inner, seconds
        self.tokenizer, self.shape, self.startup = inner.tokenizer, inner.shape, {}

    def __call__(self, *args):
        out = self.inner(*args)
        time.sleep(self.seconds)
        return out


class _SleepyTagger:
    """Host work that takes ``seconds`` per text (as POS tagging does), recording the words it saw."""

    lookahead = 2

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, words):
        time.sleep(self.seconds)
        return ["X"] * len(words)


def test_the_device_stage_overlaps_the_host_work(tiny_model_dir, monkeypatch):
    """8 batches of 1 text, 0.1 s of device time and 0.1 s of host work each: overlapped the shard takes
    about the larger stage plus one batch (0.9 s), not their sum (1.6 s)."""
    from flowray.pipeline import worker as worker_module
    from flowray.pipeline.device import ModelStage
    from flowray.pipeline.worker import FlowWorker

    config = _config(tiny_model_dir, max_tokens=8, batch_size=1)
    flow = FlowWorker(config, stage=_SleepyStage(ModelStage(config), 0.1))
    flow.pos_tagging = _SleepyTagger(0.1)
    docs = [_doc(i, f"Text number {i} is here.") for i in range(8)]
    flow.process(docs[:1])  # warm-up
    t0 = time.perf_counter()
    preds, _ = flow.process(docs)
    wall = time.perf_counter() - t0
    assert preds.column("doc_id").unique().to_pylist() == [d["doc_id"] for d in docs]
    assert 0.8 <= wall < 0.75 * 1.6, f"{wall:.2f} s: the stages ran one after the other"
    monkeypatch.setattr(worker_module, "AHEAD", 0)  # no batch ahead: the same worker runs serially
    t0 = time.perf_counter()
    flow.process(docs)
    assert time.perf_counter() - t0 >= 1.5


def test_the_device_queue_serves_the_older_shard_first():
    from flowray.pipeline.device import DeviceQueue

    queue, ran, gate = DeviceQueue(), [], threading.Event()
    first = queue.submit((0, 0), gate.wait)  # holds the device while the others queue up
    futures = [queue.submit(order, ran.append, order) for order in [(1, 0), (0, 2), (1, 1), (0, 1)]]
    gate.set()
    first.result(timeout=5)
    for f in futures:
        f.result(timeout=5)
    assert ran == [(0, 1), (0, 2), (1, 0), (1, 1)]
    failing = queue.submit((2, 0), lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=5)


def test_key_rows_split_sorted_keys_like_the_old_per_position_lists():
    import torch

    from flowray.sparse_routes import split_keys

    rng = np.random.default_rng(0)
    for T, width, p in [(7, 5, 0.3), (1, 3, 0.0), (40, 33, 0.6), (6, 4, 1.0)]:
        keys = np.flatnonzero(rng.random((T, width)) < p)
        rows = split_keys(torch.from_numpy(keys), width, T)
        expected = np.split(keys % width, np.cumsum(np.bincount(keys // width, minlength=T))[:-1])
        assert len(rows) == T and [r.tolist() for r in rows] == [e.tolist() for e in expected]
        assert rows[-1].tolist() == expected[-1].tolist() and [r.tolist() for r in rows[1:3]] == \
            [e.tolist() for e in expected[1:3]]
        assert rows.offsets.tolist() == [0, *np.cumsum([len(e) for e in expected]).tolist()]
        with pytest.raises(IndexError):
            rows[T]


def test_committed_files_use_the_column_layout_and_read_back_unchanged(worker, tmp_path):
    import polars as pl

    from flowray.pipeline.commit import commit_shard, load_shard
    from flowray.pipeline.storage import Storage

    preds, errors = worker.process(_docs()[:3])
    storage = Storage(str(tmp_path / "run"))
    commit_shard(storage, "d-00000", preds, errors, {})
    _, back, _ = load_shard(storage, "d-00000")
    assert _same_columns(back, preds) == []
    path = tmp_path / "run" / "predictions" / "d-00000.parquet"
    assert _same_columns(pl.read_parquet(path).to_arrow().cast(preds.schema), preds) == []
    meta = pq.ParquetFile(path).metadata.row_group(0)
    columns = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    vector, route, scalar = (columns["component_importance.list.element"], columns["route_heads@0.02.list.element"],
                             columns["doc_id"])
    assert "BYTE_STREAM_SPLIT" in vector.encodings and "DELTA_BINARY_PACKED" in route.encodings
    assert not vector.is_stats_set and not route.is_stats_set and scalar.is_stats_set
    assert "RLE_DICTIONARY" in scalar.encodings and {c.compression for c in columns.values()} == {"ZSTD"}
    buf = io.BytesIO()
    pq.write_table(preds, buf, compression="zstd")
    assert path.stat().st_size < len(buf.getvalue())  # smaller than zstd with dictionaries everywhere


def test_shards_in_flight_on_one_worker_give_the_rows_each_gives_alone(worker, tiny_model_dir):
    """A GPU replica's concurrent calls (``SHARDS_IN_FLIGHT`` shards, one device thread, shared token and
    tokenizer caches): every shard's tables equal the ones it gets on its own."""
    from flowray.pipeline.job import shards_in_flight
    from flowray.pipeline.worker import SHARDS_IN_FLIGHT

    gpu = _config(tiny_model_dir, gpus_per_actor=1)
    assert shards_in_flight(gpu)["max_concurrent_calls_per_actor"] == SHARDS_IN_FLIGHT > 1
    assert shards_in_flight(_config(tiny_model_dir)) == {"max_tasks_in_flight_per_actor": 1}
    docs = _docs()
    shards = [[{**d, "shard_id": f"d-{s:05d}"} for d in docs[s::SHARDS_IN_FLIGHT]] for s in range(SHARDS_IN_FLIGHT)]
    alone = [worker.process(shard) for shard in shards]
    together: list = [None] * len(shards)
    start = threading.Barrier(len(shards))

    def call(s):
        start.wait()
        together[s] = worker.process(shards[s])

    threads = [threading.Thread(target=call, args=(s,)) for s in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for (preds, errors), (preds1, errors1) in zip(together, alone):
        assert preds.num_rows > 0 and _same_columns(preds, preds1) == [] and errors.equals(errors1)
