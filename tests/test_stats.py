"""The streamed statistics (flowray.stats) equal the dense path exactly, at every tau, and stay O(T)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_models import CASES, NEW_CASES, VOCAB, tiny_model

from flowray.api import edge_importances_batch
from flowray.errors import InputError
from flowray.routes import route_masks
from flowray.stats import prediction_stats, prediction_stats_batch
from flowray.tables import head_shares

TAUS = (0.02, 0.05, 0.11)


def _words(T: int, seed: int):
    """Random word splits with a no-word token (index -1) among them."""
    rng = np.random.default_rng(seed)
    word_index = np.cumsum(rng.random(T) < 0.6) - 1
    word_index[min(2, T - 1)] = -1
    first = np.r_[True, word_index[1:] != word_index[:-1]]
    first[word_index < 0] = False
    return word_index, first


def _pruned_reference(dense, tau: float, above: float) -> np.ndarray:
    """``[T, L*H]`` bools by hand: at each position's attention node drop every part <= tau, rescale the
    kept parts to sum to 1, and keep the heads whose rescaled importance exceeds ``above``."""
    attn = np.where(dense.attn > tau, dense.attn, 0.0).sum(-1)  # [L, H, T] kept sub-edges per head
    node = attn.sum(1) + np.where(dense.attn_residual > tau, dense.attn_residual, 0.0)
    if dense.parallel:
        node = node + np.where(dense.ffn > tau, dense.ffn, 0.0)
    pruned = attn / np.where(node > 0, node, 1.0)[:, None, :]
    return (pruned > above).transpose(2, 0, 1).reshape(dense.n_tokens, -1)


def _assert_equal_to_dense(dense, stats, words, taus, source=None):
    T, L, H = dense.n_tokens, dense.n_layers, dense.n_heads
    if source is not None:
        query, positions = source
        np.testing.assert_allclose(stats.source_edges, dense.attn[:, :, query, positions].sum(-1).reshape(-1),
                                   atol=1e-6, rtol=0)
    np.testing.assert_allclose(stats.components, dense.component_importance(), atol=1e-6, rtol=0)
    assert (stats.predicted_ids == dense.predicted_ids).all()
    if words is not None:
        _, prev, same = head_shares(dense.attn, *words)
        # shares are ratios of float32 sums: a head with little total influence amplifies the last bits in
        # which the recomputed attention weights differ, hence the relative term
        np.testing.assert_allclose(stats.prev_share, prev, atol=1e-6, rtol=1e-5, equal_nan=True)
        np.testing.assert_allclose(stats.same_word_share, same, atol=1e-6, rtol=1e-5, equal_nan=True)
        assert (np.isnan(stats.prev_share) == np.isnan(prev)).all()
        assert np.isnan(stats.prev_share[0]).all()
    n_route_heads = 0
    for tau in taus:
        masks = route_masks(dense, tau)
        flat = masks.heads.reshape(T, L * H)
        assert len(stats.route_heads[tau]) == len(stats.route_ffn[tau]) == T
        for p in range(T):
            assert stats.route_heads[tau][p].tolist() == np.flatnonzero(flat[p]).tolist(), (tau, p)
            assert stats.route_ffn[tau][p].tolist() == np.flatnonzero(masks.ffn[p]).tolist(), (tau, p)
            n_route_heads += len(stats.route_heads[tau][p])
        checks = [(0.0, stats.pruned_heads[tau])]
        if hasattr(stats, "pruned_above"):  # the same sequence measured with active_above=0.2
            checks.append((0.2, stats.pruned_above[tau]))
        for above, pruned in checks:
            want = _pruned_reference(dense, tau, above)
            assert [a.tolist() for a in pruned] == [np.flatnonzero(w).tolist() for w in want], (tau, above)
    return n_route_heads


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_streamed_statistics_equal_the_dense_path(monkeypatch, case, padding_side):
    import flowray.capture

    if padding_side == "right":  # recompute the attention weights from queries and keys, row chunk by chunk
        monkeypatch.setattr(flowray.capture, "KEEP_WEIGHTS_UP_TO", 0)
    model = tiny_model(case, seed=3, attn="sdpa")
    gen = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, VOCAB, (1, T), generator=gen) for T in (13, 5, 22)]
    words = [_words(s.shape[1], i) for i, s in enumerate(seqs)]
    dense = edge_importances_batch(model, seqs, padding_side=padding_side)
    # a tiny element budget forces several chunks of query rows per layer; the default takes one
    budget = 37 if padding_side == "right" else 1 << 22
    sources = [(12, [3, 7]), None, (21, [0])]
    got = prediction_stats_batch(model, seqs, TAUS, words=words, sources=sources, padding_side=padding_side,
                                 element_budget=budget)
    above = prediction_stats_batch(model, seqs, TAUS, padding_side=padding_side, active_above=0.2)
    for g, a in zip(got, above):
        g.pruned_above = a.pruned_heads
    n = sum(_assert_equal_to_dense(d, s, w, TAUS, src) for d, s, w, src in zip(dense, got, words, sources))
    assert n > 0, "no route kept any head: the comparison would be empty"


@pytest.mark.parametrize("case", NEW_CASES)
def test_new_families_on_the_streamed_path(case):
    """Post-attention norms (row-scaled weights), soft-capping, fused projections, MoE FFNs, partial rotary."""
    model = tiny_model(case, seed=2, attn="eager" if case.startswith("gemma2") else "sdpa")
    gen = torch.Generator().manual_seed(11)
    seqs = [torch.randint(0, VOCAB, (1, T), generator=gen) for T in (11, 6)]
    words = [_words(s.shape[1], i) for i, s in enumerate(seqs)]
    dense = edge_importances_batch(model, seqs)
    got = prediction_stats_batch(model, seqs, TAUS, words=words, element_budget=40)
    assert sum(_assert_equal_to_dense(d, s, w, TAUS) for d, s, w in zip(dense, got, words)) > 0


@pytest.mark.parametrize("case", ["llama-gqa", "neox-parallel", "gpt2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_both_backends_and_both_attention_paths(case, attn):
    model = tiny_model(case, seed=5, attn=attn)
    ids = torch.randint(0, VOCAB, (1, 17), generator=torch.Generator().manual_seed(2))
    dense = edge_importances_batch(model, [ids])[0]
    words = _words(17, 4)
    for backend in ("cpu", "torch"):
        got = prediction_stats(model, ids, TAUS, word_index=words[0], first_subword=words[1], backend=backend,
                               element_budget=50)
        assert _assert_equal_to_dense(dense, got, words, TAUS) > 0


@pytest.mark.parametrize("case", ["llama-gqa", "neox-parallel"])
def test_sparse_edge_matrices_and_chunks_of_predictions(monkeypatch, case):
    """Long texts take the sparse-CSR edge matrices and several chunks of predictions: same routes."""
    import flowray.capture
    import flowray.sparse_routes as stats_module

    monkeypatch.setattr(stats_module, "DENSE_EDGES_UP_TO", 0)
    monkeypatch.setattr(flowray.capture, "KEEP_WEIGHTS_UP_TO", 0)
    monkeypatch.setattr(stats_module, "ROUTE_CHUNK", 4)
    model = tiny_model(case, seed=9, attn="sdpa")
    ids = torch.randint(0, VOCAB, (1, 19), generator=torch.Generator().manual_seed(3))
    dense = edge_importances_batch(model, [ids])[0]
    assert _assert_equal_to_dense(dense, prediction_stats(model, ids, TAUS), None, TAUS) > 0


def test_a_model_in_training_mode_is_measured_in_eval_mode_and_left_as_it_was():
    model = tiny_model("gpt2", seed=1)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    expected = prediction_stats(model.eval(), ids, TAUS)
    model.train()
    got = prediction_stats(model, ids, TAUS)
    assert model.training and all(m.training for m in model.modules())
    np.testing.assert_array_equal(got.components, expected.components)


def test_without_word_data_and_bad_inputs():
    model = tiny_model("llama-gqa")
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    st = prediction_stats(model, ids, 0.04)
    assert st.prev_share is None and st.same_word_share is None and st.taus == (0.04,)
    assert st.components.shape == (9, st.n_layers * st.n_heads + st.n_layers)
    assert st.host_bytes < 9 * (st.n_layers * st.n_heads + st.n_layers) * 4 * 3
    for bad in (0, 1, -0.1, [], "0.1", True):
        with pytest.raises(InputError, match="strictly between 0 and 1"):
            prediction_stats(model, ids, bad)
    with pytest.raises(InputError, match="one entry per token"):
        prediction_stats(model, ids, 0.04, word_index=np.zeros(3), first_subword=np.zeros(3, bool))
    with pytest.raises(InputError, match="shape"):
        prediction_stats(model, ids[0], 0.04)
    for budget in (0, -5, 2.5, True):
        with pytest.raises(InputError, match="element_budget must be a positive integer"):
            prediction_stats(model, ids, 0.04, element_budget=budget)
    with pytest.raises(InputError, match="one \\(word_index, first_subword\\) pair per sequence: 2; got 1"):
        prediction_stats_batch(model, [ids, ids[:, :4]], 0.04, words=[(np.zeros(9, int), np.ones(9, bool))])
    with pytest.raises(InputError, match="padding_side must be 'right' or 'left'"):
        prediction_stats_batch(model, [ids], 0.04, padding_side="middle")
    with pytest.raises(InputError, match="one \\(query, positions\\) pair or None per sequence: 2; got 1"):
        prediction_stats_batch(model, [ids, ids[:, :4]], 0.04, sources=[None])
    for source in ((9, [0]), (4, [5]), (4, []), (-1, [0])):
        with pytest.raises(InputError, match=f"query position in \\[0, 9\\).*got query {source[0]}"):
            prediction_stats(model, ids, 0.04, source=source)
    with pytest.raises(InputError, match="a source must be a \\(query, positions\\) pair of ints; got 'x'"):
        prediction_stats(model, ids, 0.04, source="x")
    for above in (-0.1, 1, True, "0"):
        with pytest.raises(InputError, match="active_above must be a number in \\[0, 1\\)"):
            prediction_stats(model, ids, 0.04, active_above=above)


def test_the_smollm2_ioi_prompt_equals_the_dense_path(smollm2):
    from conftest import IOI_PROMPT

    ids = smollm2.tokenizer(IOI_PROMPT, return_tensors="pt").input_ids
    dense = edge_importances_batch(smollm2, [ids])[0]
    got = prediction_stats(smollm2, ids, (0.01, 0.04), word_index=np.arange(ids.shape[1]),
                           first_subword=np.ones(ids.shape[1], bool))
    assert _assert_equal_to_dense(dense, got, (np.arange(ids.shape[1]), np.ones(ids.shape[1], bool)),
                                  (0.01, 0.04)) > 0
    assert smollm2.tokenizer.decode([int(got.predicted_ids[-1])]) == " Mary"


_PEAK = r"""
import json, resource, sys, torch, transformers as tf
sys.path.insert(0, sys.argv[1])
import flowray.capture
from flowray.stats import prediction_stats
flowray.capture.KEEP_WEIGHTS_UP_TO = 1 << 20  # 4 MiB: far below one layer's weights at this length
cfg = tf.LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     hidden_size=32, intermediate_size=40, vocab_size=97, max_position_embeddings=4096)
torch.manual_seed(0)
model = tf.LlamaForCausalLM(cfg).eval()
T = int(sys.argv[2])
small = torch.randint(0, 97, (1, 64))
prediction_stats(model, small, (0.01, 0.04))  # warm-up: compiled kernels, allocator
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ids = torch.randint(0, 97, (1, T))
st = prediction_stats(model, ids, (0.01, 0.04), element_budget=1 << 18)
extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"extra_kib": extra, "T": st.n_tokens}))
"""


@pytest.mark.slow
def test_the_streamed_path_never_holds_a_full_layer_of_importances():
    """At 2048 tokens one layer's [H, T, T] float32 importances are 64 MiB and [L, H, T, T] 192 MiB; the
    streamed path's peak extra memory (a fresh process, ru_maxrss) must stay far below one layer."""
    T, L, H = 2048, 3, 4
    out = subprocess.run([sys.executable, "-c", _PEAK, str(__import__("pathlib").Path(__file__).parent), str(T)],
                         capture_output=True, text=True, timeout=600, check=True)
    extra_mib = json.loads(out.stdout.strip().splitlines()[-1])["extra_kib"] / 1024
    one_layer_mib = H * T * T * 4 / 2**20
    assert extra_mib < one_layer_mib / 2, f"peak extra {extra_mib:.0f} MiB vs one layer {one_layer_mib:.0f} MiB"
