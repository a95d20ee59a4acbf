"""The map stage's worker called directly (no cluster), the tables' aggregations, and storage."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from flowray.pipeline.storage import Storage
from flowray.tables import (
    ERRORS,
    Accumulator,
    column_tau,
    head_shares,
    predictions_schema,
    tau_columns,
)

TAUS = (0.02, 0.05)


def _worker_config(model_dir, **kw):
    from flowray.config import CorpusConfig, JobConfig

    return JobConfig(corpora=(CorpusConfig(domain="d", source={"kind": "pydoc_topics"}),), model=str(model_dir),
                     tau=TAUS, **kw)


def _doc(doc_id, text, *, is_task=False, meta=None, language="en"):
    return {"shard_id": "s-00000", "doc_id": doc_id, "domain": "d", "language": language, "is_task": is_task,
            "text": text, "meta": json.dumps(meta or {})}


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    from flowray.pipeline.worker import FlowWorker

    return FlowWorker(_worker_config(tiny_model_dir, max_tokens=12, truncate=True, batch_size=3))


@pytest.mark.slow
def test_worker_turns_texts_into_one_row_per_prediction(worker):
    docs = [_doc("a", "The cat sat on the mat."), _doc("b", "Unbelievable results, said Mary."),
            _doc("c", "   "), _doc("d", "one two three four five six seven eight nine ten eleven twelve thirteen"),
            _doc("e", None), _doc("f", "When Mary and John went out, John gave it to", is_task=True,
                                  meta={"answer": " Mary"})]
    preds, errors = worker.process(docs)
    assert preds.schema.equals(predictions_schema(TAUS))
    assert errors.schema.equals(ERRORS)
    # every doc exactly once: predictions for a, b, d, f; error rows for the empty and the non-string text
    assert set(preds.column("doc_id").to_pylist()) == {"a", "b", "d", "f"}
    assert sorted(errors.column("doc_id").to_pylist()) == ["c", "e"]
    assert "empty" in errors.filter(pa.compute.equal(errors.column("doc_id"), "c")).column("error")[0].as_py()
    df = pl.from_arrow(preds)
    tok = worker.tokenizer
    n_a = len(tok("The cat sat on the mat.").input_ids)
    a = df.filter(pl.col("doc_id") == "a").sort("position")
    # the BOS sits at position 0 of the model's input; its own prediction is no row
    assert a.height == n_a and a["position"].to_list() == list(range(1, n_a + 1))
    assert a["bos"].all() and (a["n_tokens"] == n_a + 1).all()
    assert a["next_token_id"].to_list()[:-1] == a["token_id"].to_list()[1:]  # next token from the text
    assert a["next_token_id"][-1] is None and a["target"].all()
    if worker.pos_tagging is None:  # no tagger data: POS is off, and visibly so (null, never made up)
        assert a["pos"].null_count() == a.height
    d = df.filter(pl.col("doc_id") == "d")
    assert d.height == 12  # truncated to max_tokens, the cut-off token still known as the next token
    assert d.sort("position")["next_token_id"][-1] is not None
    f = df.filter(pl.col("doc_id") == "f").sort("position")
    assert f["target"].to_list() == [False] * (f.height - 1) + [True]  # tasks: only the last position
    assert f["next_token"][-1] == " Mary"
    assert f["predicted_token"].to_list() == [tok.decode([i]) for i in f["predicted_id"].to_list()]
    L, H = worker.shape.n_layers, worker.shape.n_heads
    comps = np.stack(a["component_importance"].to_list())
    assert comps.shape == (n_a, L * H + L) and np.all((comps >= 0) & (comps <= 1 + 1e-6))
    for tau in TAUS:
        heads = a[tau_columns(tau).route_heads].to_list()
        assert all(0 <= h < L * H for row in heads for h in row)
    # a larger tau keeps a subset of the heads, per prediction
    small, large = a[tau_columns(TAUS[0]).route_heads].to_list(), a[tau_columns(TAUS[1]).route_heads].to_list()
    assert all(set(lg) <= set(sm) for sm, lg in zip(small, large))


@pytest.mark.slow
def test_worker_tags_parts_of_speech(worker):
    assert worker.pos_tagging is not None, "the tagger ships with the package, yet the worker turned POS off"
    preds, _ = worker.process([_doc("a", "The cat sat on the mat.")])
    a = pl.from_arrow(preds).sort("position")
    assert a["pos"].to_list()[:2] == ["DET", "NOUN"]
    assert a["next_pos"].to_list()[:2] == ["NOUN", "VERB"]


@pytest.mark.slow
def test_worker_without_truncation_reports_too_long_texts(tiny_model_dir):
    from flowray.pipeline.worker import FlowWorker

    w = FlowWorker(_worker_config(tiny_model_dir, max_tokens=4, truncate=False))
    preds, errors = w.process([_doc("long", "one two three four five six"), _doc("ok", "one two")])
    assert preds.column("doc_id").unique().to_pylist() == ["ok"]
    assert "max_tokens=4" in errors.column("error")[0].as_py()


def test_head_shares_hand_computed():
    # 1 layer, 2 heads, 3 tokens; tokens 1 and 2 are the same word (token 2 a later subword)
    attn = np.zeros((1, 2, 3, 3), dtype=np.float32)
    attn[0, 0, 1] = [0.1, 0.3, 0]      # head 0 at pos 1: prev share 0.1 / 0.4 = 0.25
    attn[0, 0, 2] = [0.0, 0.6, 0.2]    # pos 2: prev 0.6/0.8 = .75; same word (j=1) 0.75
    attn[0, 1, 2] = [0.5, 0.0, 0.0]    # head 1 at pos 2: prev share 0, same word 0
    total, prev, same = head_shares(attn, np.array([0, 1, 1]), np.array([True, True, False]))
    assert np.isnan(prev[0]).all()  # position 0 has no previous token
    np.testing.assert_allclose(prev[1, 0], 0.25)
    assert np.isnan(prev[1, 1])  # head 1 has no influence at pos 1
    np.testing.assert_allclose(prev[2], [0.75, 0.0])
    np.testing.assert_allclose(same[2], [0.75, 0.0])
    assert np.isnan(same[1]).all()  # first subwords have no same-word share
    np.testing.assert_allclose(total[2], [0.8, 0.5])


def _rows(domain, n, *, prev, same, first, comps, heads, target=True, start=0, word=0, position=1, bos=False,
          pruned=None, source=None, taus=(0.03,)):
    """n identical prediction rows for a 1-layer, 2-head model (``pruned``: default, the heads whose raw
    importance is above the silence threshold), the same route columns at every tau."""
    schema = predictions_schema(taus)
    pruned = [h for h in range(2) if comps[h] > 5e-5] if pruned is None else pruned
    data = {
        "domain": [domain] * n, "shard_id": ["s"] * n, "doc_id": [f"{domain}{i}" for i in range(start, start + n)],
        "position": [position] * n, "n_tokens": [position + 1] * n, "bos": [bos] * n, "token_id": [0] * n,
        "token": ["x"] * n, "next_token_id": [None] * n, "next_token": [None] * n, "predicted_id": [0] * n,
        "predicted_token": ["x"] * n, "word_index": [word] * n,
        "first_subword": [first] * n, "pos": ["NOUN"] * n, "next_pos": [None] * n, "target": [target] * n,
        "component_importance": [comps] * n, "prev_token_share": [prev] * n, "same_word_share": [same] * n,
        "source_edge_importance": [source] * n,
    }
    for tau in taus:
        cols = tau_columns(tau)
        data |= {cols.route_heads: [heads] * n, cols.route_ffn: [[0]] * n, cols.pruned_heads: [pruned] * n}
    return pa.table(data, schema=schema)


def test_every_column_of_a_tau_is_named_in_one_place_and_read_back():
    cols = tau_columns(0.03)
    assert (cols.route_heads, cols.route_ffn, cols.pruned_heads) == ("route_heads@0.03", "route_ffn@0.03",
                                                                     "pruned_heads@0.03")
    roles = Accumulator(1, 2, (0.01, 0.03), general_domain="gen")
    roles.update(_rows("gen", 2, prev=[0.9, 0.1], same=[0.9, 0.9], first=True, comps=[0.2, 0.01, 0.5], heads=[0],
                       taus=(0.01, 0.03)))
    names = [*predictions_schema((0.01, 0.03)).names, *roles.tables()["head_roles"].columns]
    by_tau = {}
    for name in names:
        by_tau.setdefault(column_tau(name), set()).add(name)
    for tau in (0.01, 0.03):
        fields = tau_columns(tau)
        assert by_tau[tau] == {getattr(fields, f) for f in ("route_heads", "route_ffn", "pruned_heads",
                                                             "silent_fraction_pruned", "subword_merging_pruned")}
    assert set(by_tau) == {None, 0.01, 0.03}
    assert column_tau("route_heads@x") is None and column_tau("other@0.03") is None


def test_accumulator_roles_frequencies_and_specialisation():
    acc = Accumulator(1, 2, (0.03,), general_domain="gen")
    # general: head 0 puts 90% of its influence on the previous token in 8 of 10 cases -> previous-token head
    acc.update(_rows("gen", 8, prev=[0.9, 0.1], same=[0.9, 0.9], first=False, comps=[0.2, 0.01, 0.5], heads=[0]))
    acc.update(_rows("gen", 2, prev=[0.2, 0.1], same=[0.9, 0.9], first=False, comps=[0.2, 0.01, 0.5], heads=[0, 1],
                     start=8))
    # head 1 is silent on first subwords in 10/10 cases and merges later subwords in 10/10 -> subword merging
    acc.update(_rows("gen", 10, prev=[0.9, 0.0], same=[0.0, 0.0], first=True, comps=[0.2, 0.0, 0.5], heads=[0],
                     start=10))
    # code: head 1 matters ten times more than in general
    acc.update(_rows("code", 5, prev=[0.9, 0.1], same=[0.9, 0.9], first=False, comps=[0.2, 0.3, 0.5], heads=[1]))
    t = acc.tables()
    roles = t["head_roles"].filter(pl.col("domain") == "gen").sort("head")
    assert roles["role"].to_list() == ["previous_token", "subword_merging"]
    np.testing.assert_allclose(roles["previous_token_fraction"].to_list(), [18 / 20, 0.0])
    act = t["head_activation"].filter(pl.col("domain") == "gen").sort("head")
    np.testing.assert_allclose(act["frequency"].to_list(), [1.0, 2 / 20])
    spec = t["domain_specialisation"].filter((pl.col("domain") == "code") & (pl.col("head") == 1))
    # general mean of head 1: (10 x 0.01 + 10 x 0.0) / 20 = 0.005; code: 0.3 -> ratio 60
    assert spec["specialised"].item() and spec["ratio"].item() == pytest.approx(60.0, rel=1e-5)
    comp = t["component_importance"].filter((pl.col("domain") == "gen") & (pl.col("component") == "ffn"))
    assert comp["importance"].item() == pytest.approx(0.5)
    assert t["domain_summary"].sort("domain")["texts"].to_list() == [5, 20]


def test_storage_writes_whole_files_and_lists_them(tmp_path):
    st = Storage(str(tmp_path / "run"))
    st.write_json("done/a.json", {"x": 1})
    st.write_table("t/x.parquet", pa.table({"a": [1, 2]}))
    assert st.exists("done/a.json") and not st.exists("done/b.json")
    assert st.list("done", ".json") == ["a.json"] and st.list("missing") == []
    assert st.read_json("done/a.json") == {"x": 1}
    assert st.read_table("t/x.parquet").column("a").to_pylist() == [1, 2]
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "run" / "done").iterdir())


@pytest.mark.slow
def test_encode_text_tokenises_as_the_job_does(worker):
    """``flowray.encode_text`` is the public way to get the ids a job replica feeds the model: BOS first,
    ``max_tokens`` text tokens after it."""
    import flowray

    text = "one two three four five six seven eight nine ten eleven twelve thirteen"  # cut at 12 tokens
    preds, _ = worker.process([_doc("a", text)])
    rows = pl.from_arrow(preds).sort("position")
    ids = flowray.encode_text(worker.tokenizer, text, max_tokens=12)[0].tolist()  # [T]
    assert ids[0] == worker.bos.token_id and len(ids) == 13
    assert rows["position"].to_list() == list(range(1, 13))  # the BOS's own prediction is no row
    assert rows["token_id"].to_list() == ids[1:]
