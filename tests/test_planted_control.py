"""The planted positive control (issue 11 item 5): a hand-built model whose head roles are known.

``tests/planted.py`` builds a 2-layer, 4-head GPT-2 by hand with a previous-token head, a subword-merging
head (silent on first subwords: it parks on a zero-value BOS), a code-only head and five random heads.
A small corpus job over two domains must report exactly those heads in those roles. The mechanism tests
come first, so a failure says which part broke: the tokenizer's word splits, an attention pattern, a value
that should be zero, or the job's statistics.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

import planted as P

from flowray.tables import tau_columns

TAUS = (0.01, 0.03)
FLAT = {name: layer * P.N_HEADS + head for name, (layer, head) in
        {"prev": P.PREV_HEAD, "merge": P.MERGE_HEAD, "domain": P.DOMAIN_HEAD}.items()}
CLEAR = 0.95  # the planted heads' fractions are ~1.0 by construction
FAR_BELOW = 0.5  # every criterion the others (and the planted heads off their role) must stay under


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return P.save_planted(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="module")
def loaded(model_dir):
    import flowray

    lm = flowray.load_model(str(model_dir), device="cpu")  # as the job loads it (sdpa attention) ...
    lm.model.set_attn_implementation("eager")  # ... then eager, so that a forward returns its attentions
    return lm


def _forward(lm, text):
    enc = lm.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = lm.model(enc.input_ids, output_attentions=True, output_hidden_states=True)
    tokens = [lm.tokenizer.decode([i]) for i in enc.input_ids[0].tolist()]
    return enc.input_ids[0], tokens, out


def _values(lm, hidden, layer, head):
    """``[T, dh]`` the head's value vectors (bias included) from the block's input ``[T, d]``."""
    block = lm.model.transformer.h[layer]
    qkv = block.attn.c_attn(block.ln_1(hidden))  # [T, 3d]
    d, dh = P.D_MODEL, P.HEAD_DIM
    return qkv[:, 2 * d + head * dh : 2 * d + (head + 1) * dh]


# --- the mechanism, part by part -------------------------------------------------------------------
def test_tokenizer_adds_bos_and_gives_the_known_word_splits(loaded):
    from flowray.text import align_words

    tok = loaded.tokenizer
    for domain, words in P.WORDS.items():
        for word in words:
            ids = tok("".join(word), add_special_tokens=False).input_ids
            assert [tok.decode([i]) for i in ids] == list(word), f"{domain} word {word} is split otherwise"
    text = P.make_texts("general", 1)[0]
    assert text.startswith(" ") and "  " not in text and text.replace(" ", "").isalpha()
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=True)
    assert enc.input_ids[0] == tok.bos_token_id and enc.offset_mapping[0] == (0, 0)
    pieces = [tok.decode([i]) for i in enc.input_ids[1:]]
    words = align_words(text, [tuple(o) for o in enc.offset_mapping], language="xx")
    assert words.word_index[0] == -1 and not words.first_subword[0]  # BOS belongs to no word
    assert words.first_subword[1:] == [p.startswith(" ") for p in pieces]  # word starts carry the space
    assert words.word_index[1:] == list(np.cumsum([p.startswith(" ") for p in pieces]) - 1)


def test_residual_stream_stays_zero_mean(loaded):
    """LayerNorm then only rescales: a feature absent from x stays absent after LN (see planted.py)."""
    _, _, out = _forward(loaded, P.make_texts("code", 1)[0])
    for layer, hidden in enumerate(out.hidden_states[: P.N_LAYERS]):
        assert hidden[0].mean(-1).abs().max() < 1e-6, f"layer {layer}'s input is not zero-mean"


@pytest.mark.parametrize("domain", ["general", "code"])
def test_planted_attention_patterns(loaded, domain):
    _, tokens, out = _forward(loaded, P.make_texts(domain, 1, seed=1)[0])
    T = len(tokens)
    prev = out.attentions[P.PREV_HEAD[0]][0, P.PREV_HEAD[1]]  # [T, T]
    assert min(prev[p, p - 1].item() for p in range(1, T)) > 0.999, "previous-token head is not sharp"
    merge = out.attentions[P.MERGE_HEAD[0]][0, P.MERGE_HEAD[1]]
    for p in range(1, T):
        if tokens[p].startswith(" "):  # a first subword: parked on BOS
            assert merge[p, 0].item() > 1 - 1e-9, f"merging head at first subword {p} ({tokens[p]!r})"
        else:  # a later subword: the earlier subword of its word
            assert merge[p, p - 1].item() > 0.999, f"merging head at later subword {p} ({tokens[p]!r})"
    domain_head = out.attentions[P.DOMAIN_HEAD[0]][0, P.DOMAIN_HEAD[1]]
    assert min(domain_head[p, p].item() for p in range(T)) > 0.99, "domain head does not attend to itself"
    for layer in range(P.N_LAYERS):
        for head in range(P.N_HEADS):
            if (layer, head) not in (P.PREV_HEAD, P.MERGE_HEAD, P.DOMAIN_HEAD):
                a = out.attentions[layer][0, head]
                assert a[1:].max() < 0.9 and np.mean([a[p, p - 1].item() for p in range(1, T)]) < 0.5, \
                    f"random head {layer}.{head} is sharp"


def test_planted_values(loaded):
    """Zero value where a head must have no influence (the merging head at BOS, the domain head off code
    tokens), a non-zero one everywhere else, BOS included for the previous-token head."""
    code = P.code_pieces()
    for domain in ("general", "code"):
        _, tokens, out = _forward(loaded, P.make_texts(domain, 1, seed=2)[0])
        h0, h1 = out.hidden_states[0][0], out.hidden_states[1][0]
        with torch.no_grad():
            prev = _values(loaded, h0, *P.PREV_HEAD).norm(dim=-1)  # [T]
            merge = _values(loaded, h0, *P.MERGE_HEAD).norm(dim=-1)
            dom = _values(loaded, h1, *P.DOMAIN_HEAD).norm(dim=-1)
        assert prev.min() > 0.5, "previous-token head writes nothing somewhere"
        assert merge[0] < 1e-5 and merge[1:].min() > 0.5, "merging head: value at BOS must be 0, elsewhere not"
        is_code = torch.tensor([t in code for t in tokens])
        assert dom[~is_code].max() < 1e-5, "domain head has a value off the code tokens"
        if is_code.any():
            assert dom[is_code].min() > 0.5, "domain head has no value on a code token"


# --- the job ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def job_tables(model_dir):
    from flowray.config import CorpusConfig, JobConfig
    from flowray.pipeline.worker import FlowWorker
    from flowray.tables import Accumulator

    corpora = tuple(CorpusConfig(domain=d, source={"kind": "pydoc_topics"}) for d in ("general", "code"))
    config = JobConfig(corpora=corpora, general_domain="general", model=str(model_dir), tau=TAUS,
                       max_tokens=P.N_POSITIONS, truncate=False, batch_size=4, device="cpu")
    worker = FlowWorker(config)
    docs = [{"shard_id": "s-00000", "doc_id": f"{domain}-{i}", "domain": domain, "language": "en",
             "is_task": False, "text": text, "meta": json.dumps({})}
            for domain in ("general", "code") for i, text in enumerate(P.make_texts(domain, 8))]
    predictions, errors = worker.process(docs)
    assert errors.num_rows == 0, errors.to_pylist()
    assert set(predictions.column("doc_id").to_pylist()) == {d["doc_id"] for d in docs}
    acc = Accumulator(P.N_LAYERS, P.N_HEADS, TAUS, general_domain="general")
    acc.update(predictions)
    return acc.tables()


def test_job_reports_exactly_the_planted_roles(job_tables):
    roles = job_tables["head_roles"].filter(pl.col("domain") == "*all*")
    found = {(r["layer"], r["head"]): r["role"] for r in roles.iter_rows(named=True) if r["role"] is not None}
    assert found == {P.PREV_HEAD: "previous_token", P.MERGE_HEAD: "subword_merging"}, roles
    assert (roles["cases_later_subword"] > 0).all() and (roles["cases_first_subword"] > 0).all()
    by_flat = {r["layer"] * P.N_HEADS + r["head"]: r for r in roles.iter_rows(named=True)}
    prev, merge = by_flat[FLAT["prev"]], by_flat[FLAT["merge"]]
    # the planted heads meet their criteria by a clear margin ...
    assert prev["previous_token_fraction"] > CLEAR, prev
    assert merge["subword_merging_fraction"] > CLEAR and merge["first_subword_silent_fraction"] > CLEAR, merge
    # ... and miss the others: the merging head attends to the previous token only at later subwords
    # (~35% of the cases), the previous-token head is never silent
    assert merge["previous_token_fraction"] < FAR_BELOW, merge
    assert prev["first_subword_silent_fraction"] < 1 - CLEAR, prev
    # silence after tau-pruning agrees: no sub-edge of the merging head survives on a first subword
    for tau in (0.01, 0.03):
        cols = tau_columns(tau)
        assert merge[cols.silent_fraction_pruned] > CLEAR, merge
        assert prev[cols.silent_fraction_pruned] < 1 - CLEAR, prev
        flagged = [flat for flat, row in by_flat.items() if row[cols.subword_merging_pruned]]
        assert flagged == [FLAT["merge"]], (tau, flagged)
    for flat, row in by_flat.items():
        if flat in (FLAT["prev"], FLAT["merge"]):
            continue
        assert row["previous_token_fraction"] < FAR_BELOW, row
        assert row["subword_merging_fraction"] < FAR_BELOW, row


def test_job_flags_exactly_the_domain_head(job_tables):
    spec = job_tables["domain_specialisation"]
    flagged = {(r["domain"], r["layer"], r["head"]) for r in spec.filter(pl.col("specialised")).iter_rows(named=True)}
    assert flagged == {("code", *P.DOMAIN_HEAD)}, spec
    comp = job_tables["component_importance"].filter(pl.col("component") == "head")
    general = comp.filter((pl.col("domain") == "general") & (pl.col("layer") == P.DOMAIN_HEAD[0])
                          & (pl.col("head") == P.DOMAIN_HEAD[1]))["importance"].item()
    assert general < 1e-6, "the domain head has influence on general text"
    code = spec.filter((pl.col("domain") == "code") & (pl.col("layer") == P.DOMAIN_HEAD[0])
                       & (pl.col("head") == P.DOMAIN_HEAD[1]))
    others = spec.filter((pl.col("domain") == "code") & ~((pl.col("layer") == P.DOMAIN_HEAD[0])
                                                          & (pl.col("head") == P.DOMAIN_HEAD[1])))
    assert code["importance"].item() > 1.5 * others["importance"].max(), "the domain head is not clearly the top head"
