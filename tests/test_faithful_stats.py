"""Paper-faithful corpus statistics (issue 11): the BOS, subword cases, silence measured two ways, task
targets at every generation step and the contrastive source sub-edge."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import polars as pl
import pytest
import torch
from conftest import save_tiny_llama
from test_pipeline import _doc, _rows, _worker_config

from flowray.errors import InputError
from flowray.tables import Accumulator, tau_columns
from flowray.text import document_start


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm2):
    """A tiny random Llama with SmolLM2's tokenizer and room for a task prompt and its answer (64 positions)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-64"), smollm2.tokenizer, 64)


@pytest.fixture(scope="module")
def worker(model_dir):
    from flowray.pipeline.worker import FlowWorker

    return FlowWorker(_worker_config(model_dir, max_tokens=40, batch_size=2))


@pytest.fixture(scope="module")
def worker_without_bos(model_dir):
    from flowray.pipeline.worker import FlowWorker

    return FlowWorker(_worker_config(model_dir, max_tokens=40, prepend_bos=False))


class _Tok:
    """The parts of a tokenizer document_start reads."""

    def __init__(self, adds_bos: bool, vocab: dict, bos=None, eos=None):
        self.adds_bos, self.vocab = adds_bos, vocab
        self.bos_token, self.eos_token = bos, eos
        self.bos_token_id = vocab.get(bos)

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([self.bos_token_id] if self.adds_bos and add_special_tokens else []) + [7]}

    def get_vocab(self):
        return self.vocab


def test_document_start_prefers_the_tokenizers_bos_then_the_document_separator(smollm2):
    start = document_start(smollm2.tokenizer)  # SmolLM2 adds no BOS: its pretraining separator
    assert (start.token, start.token_id, start.source) == ("<|endoftext|>", 0, "document separator")
    llama = _Tok(True, {"<s>": 1, "</s>": 2}, bos="<s>", eos="</s>")
    assert document_start(llama).to_dict() == {"token_id": 1, "token": "<s>", "source": "tokenizer BOS"}
    plain = _Tok(False, {"<bos>": 3, "<eos>": 4}, bos="<bos>", eos="<eos>")
    assert document_start(plain).token == "<eos>"
    with pytest.raises(InputError, match="prepend_bos: false"):
        document_start(_Tok(False, {"a": 0}))


def test_bos_at_position_0_by_default_and_absent_without(worker, worker_without_bos):
    text = "The cat sat on the mat."
    bos = worker.bos.token_id
    with_bos = worker._prepare(0, _doc("a", text))
    without = worker_without_bos._prepare(0, _doc("a", text))
    assert with_bos.ids[0] == bos and with_bos.ids[1:] == without.ids and bos not in without.ids
    rows = pl.from_arrow(worker.process([_doc("a", text)])[0])
    plain = pl.from_arrow(worker_without_bos.process([_doc("a", text)])[0])
    assert rows["position"].to_list() == list(range(1, len(without.ids) + 1)) and rows["bos"].all()
    assert plain["position"].to_list() == list(range(len(without.ids))) and not plain["bos"].any()
    assert rows["token_id"].to_list() == plain["token_id"].to_list()  # the same text tokens, one BOS before
    # max_tokens counts the text's tokens, the BOS comes on top
    long = worker._prepare(0, _doc("b", " ".join(["word"] * 50)))
    assert len(long.ids) == 41 and long.ids[0] == bos


def test_whitespace_tokens_are_neither_first_nor_later_subwords(worker):
    rows = pl.from_arrow(worker.process([_doc("a", "Unbelievable\n\nresults\n said")])[0]).sort("position")
    space = rows.filter(pl.col("word_index") < 0)
    assert space.height >= 1 and not space["first_subword"].any()
    assert all(np.isnan(v).all() for v in space["same_word_share"].to_list())  # not a later subword case
    acc = Accumulator(1, 2, (0.03,), general_domain="d")
    common = dict(prev=[0.9, 0.1], same=[float("nan")] * 2, comps=[0.2, 0.0, 0.5], heads=[0])
    acc.update(_rows("d", 4, first=False, word=-1, **common))  # whitespace rows: in no subword set
    acc.update(_rows("d", 3, first=False, word=2, start=4, **{**common, "same": [0.0, 0.9]}))
    roles = acc.tables()["head_roles"].filter(pl.col("domain") == "d").sort("head")
    assert roles["cases_later_subword"].to_list() == [3, 3] and roles["cases_first_subword"].to_list() == [0, 0]
    np.testing.assert_allclose(roles["subword_merging_fraction"].to_list(), [0.0, 1.0])  # 3 of 3, not 3 of 7
    assert roles["later_subword_zero_influence"].to_list() == [0, 3]  # head 1 has no influence: a failure


def test_the_two_silence_measures_by_hand():
    acc = Accumulator(1, 2, (0.03,), general_domain="d")
    # 10 first subwords. Head 0: raw 0.5 everywhere, in the pruned graph in 6 of them.
    # Head 1: raw 4e-5 (silent) in 7, 0.02 in 3, and its sub-edges never survive pruning.
    acc.update(_rows("d", 6, prev=[0.0, 0.0], same=[np.nan] * 2, first=True, comps=[0.5, 4e-5, 0.4],
                     heads=[0], pruned=[0]))
    acc.update(_rows("d", 1, prev=[0.0, 0.0], same=[np.nan] * 2, first=True, comps=[0.5, 4e-5, 0.4],
                     heads=[0], pruned=[], start=6))
    acc.update(_rows("d", 3, prev=[0.0, 0.0], same=[np.nan] * 2, first=True, comps=[0.5, 0.02, 0.4],
                     heads=[0], pruned=[], start=7))
    roles = acc.tables()["head_roles"].filter(pl.col("domain") == "d").sort("head")
    np.testing.assert_allclose(roles["first_subword_silent_fraction"].to_list(), [0.0, 0.7])
    np.testing.assert_allclose(roles[tau_columns(0.03).silent_fraction_pruned].to_list(), [0.4, 1.0])
    # the previous-token denominator skips the first text token when a BOS precedes it
    acc = Accumulator(1, 2, (0.03,), general_domain="d")
    acc.update(_rows("d", 2, prev=[0.9, 0.9], same=[np.nan] * 2, first=True, comps=[0.5, 0.5, 0.0], heads=[0],
                     position=1, bos=True))
    acc.update(_rows("d", 3, prev=[0.9, 0.9], same=[np.nan] * 2, first=True, comps=[0.5, 0.5, 0.0], heads=[0],
                     position=1, bos=False, start=2))
    assert acc.tables()["head_roles"]["cases_previous"].to_list()[:2] == [3, 3]


def _task_docs(tokenizer, task: str, variant: str = "original", n: int = 3) -> list[dict]:
    from flowray.corpora import iter_documents

    src = {"kind": "task", "task": task, "variant": variant, "n": n, "seed": None}
    docs = iter_documents(src, limit=n, seed=0, tokenizer=tokenizer)
    return [{"shard_id": "s", "doc_id": d.doc_id, "domain": f"{task}-{variant}", "language": "en", "is_task": True,
             "text": d.text, "meta": json.dumps(d.meta)} for d in docs]


def test_arithmetic_texts_yield_one_target_row_per_answer_token(worker):
    docs = _task_docs(worker.tokenizer, "addition")
    rows = pl.from_arrow(worker.process(docs)[0])
    for doc in docs:
        meta = json.loads(doc["meta"])
        answer = worker.tokenizer(meta["completion"], add_special_tokens=False).input_ids
        mine = rows.filter(pl.col("doc_id") == doc["doc_id"]).sort("position")
        target = mine.filter(pl.col("target"))
        assert target.height == len(answer) == len(meta["completion"])  # SmolLM2 writes digits one by one
        assert target["next_token_id"].to_list() == answer  # each generation step predicts the next digit
        assert "".join(target["next_token"].to_list()) == meta["completion"]
        assert mine["position"].to_list()[-1] == target["position"].to_list()[-1] + 1  # the last digit: no target
    short = type(worker).__new__(type(worker))
    short.__dict__.update(worker.__dict__, config=dataclasses.replace(worker.config, max_tokens=12))  # no reload
    _, errors = short.process(docs[:1])  # a task text cut by max_tokens would study the wrong prediction
    assert "raise max_tokens" in errors.column("error")[0].as_py()


def test_ioi_source_sub_edges_equal_the_dense_path(worker):
    from flowray.api import edge_importances

    docs = _task_docs(worker.tokenizer, "ioi", n=2)
    rows = pl.from_arrow(worker.process(docs)[0])
    for doc in docs:
        mine = rows.filter(pl.col("doc_id") == doc["doc_id"]).sort("position")
        assert mine["target"].to_list() == [False] * (mine.height - 1) + [True]
        assert mine["source_edge_importance"].null_count() == mine.height - 1
        prep = worker._prepare(0, doc)
        query, positions = prep.source
        io = json.loads(doc["meta"])["io"]
        assert query == len(prep.ids) - 1 and [worker.tokenizer.decode([prep.ids[j]]) for j in positions] == [f" {io}"]
        dense = edge_importances(worker.lm, torch.tensor([prep.ids]))
        np.testing.assert_allclose(mine["source_edge_importance"][-1].to_numpy(),
                                   dense.attn[:, :, query, positions].sum(-1).reshape(-1), atol=1e-6)


def test_contrastive_edges_pair_prompts_with_their_twins():
    acc = Accumulator(1, 2, (0.03,), general_domain="ioi", contrasts=[("ioi", "ioi_twin")])
    base = dict(prev=[0.0, 0.0], same=[np.nan] * 2, first=True, comps=[0.5, 0.5, 0.0], heads=[0])
    for i, (a, b) in enumerate([((0.5, 0.1), (0.1, 0.1)), ((0.3, 0.2), (0.2, 0.3)), ((0.4, 0.0), (0.0, 0.0))]):
        acc.update(_rows("ioi", 1, source=list(a), start=i, **base))
        acc.update(_rows("ioi_twin", 1, source=list(b), start=i, **base).set_column(
            2, "doc_id", __import__("pyarrow").array([f"ioi{i}"])))  # twin i has prompt i's doc id
    edges = acc.tables()["contrastive_edges"].sort("head")
    diffs = np.array([[0.4, 0.0], [0.1, -0.1], [0.4, 0.0]])
    assert edges["n_pairs"].to_list() == [3, 3]
    np.testing.assert_allclose(edges["difference"].to_list(), diffs.mean(0), atol=1e-7)
    np.testing.assert_allclose(edges["se"].to_list(), diffs.std(0, ddof=1) / np.sqrt(3), atol=1e-7)


def test_job_config_pairs_each_contrastive_domain_with_its_original():
    from flowray.config import CorpusConfig, JobConfig

    def task(domain, variant, **kw):
        return CorpusConfig(domain=domain, source={"kind": "task", "task": "greater_than", "variant": variant,
                                                   "n": 5, "seed": None, "contrastive_yy": "01", **kw})

    cfg = JobConfig(corpora=(CorpusConfig(domain="p", source={"kind": "pydoc_topics"}), task("gt", "original"),
                             task("gt_c", "contrastive"), task("gt_00", "contrastive")))
    assert cfg.contrasts == (("gt", "gt_c"), ("gt", "gt_00"))
    assert cfg.prepend_bos is True
