"""Short sequences of a right-padded batch share one kernel call per layer, and the comparison's narrower
statistics (last prediction only, no pruned silence): each equals the dense path exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_stats import TAUS, _assert_equal_to_dense, _words
from tiny_models import CASES, NEW_CASES, VOCAB, tiny_model

from flowray.api import edge_importances_batch
from flowray.errors import InputError
from flowray.importance import head_outputs, head_outputs_of
from flowray.kernels.cpu import CpuKernel
from flowray.kernels.torch_kernel import TorchKernel
from flowray.routes import route_masks
from flowray.stats import prediction_stats, prediction_stats_batch

LENGTHS = (13, 5, 22, 1, 9)


def _spy_blocks(monkeypatch) -> list[int]:
    """The number of sequences of every block the CPU kernel computes from here on."""
    sizes: list[int] = []
    real = CpuKernel.block

    def spy(self, blk, out):
        sizes.append(int(blk.probs.shape[0]))
        return real(self, blk, out)

    monkeypatch.setattr(CpuKernel, "block", spy)
    return sizes


@pytest.mark.parametrize("case", CASES + NEW_CASES)
def test_a_block_of_short_sequences_equals_the_dense_path(monkeypatch, case):
    """Every family (post-attention norms' row scales, soft-capping, parallel blocks, MoE) with lengths
    1 to 22 side by side on one padded grid: components, shares, sources, routes, pruned heads, predictions."""
    model = tiny_model(case, seed=4, attn="eager" if case.startswith("gemma2") else "sdpa")
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, VOCAB, (1, T), generator=gen) for T in LENGTHS]
    words = [_words(s.shape[1], i) for i, s in enumerate(seqs)]
    sources = [(12, [3, 7]), None, (21, [0, 20]), (0, [0]), None]
    dense = edge_importances_batch(model, seqs)
    sizes = _spy_blocks(monkeypatch)
    got = prediction_stats_batch(model, seqs, TAUS, words=words, sources=sources)
    assert max(sizes) == len(seqs), f"the batch was not one block: {sorted(set(sizes))}"
    n = sum(_assert_equal_to_dense(d, s, w, TAUS, src) for d, s, w, src in zip(dense, got, words, sources))
    assert n > 0


def test_a_budget_splits_the_batch_into_blocks_and_left_padding_keeps_one_per_sequence(monkeypatch):
    H = 3
    right = [(0, 5), (0, 13), (0, 4), (0, 22), (0, 2)]
    # a block's [G, H, T_max, T_max] must fit: 5 and 13 (2*3*13^2 = 1014), 4 alone would make 22 exceed
    assert CpuKernel().plan(right, H, 1100) == [(0, 2, 0, 13), (2, 3, 0, 4), (3, 4, 0, 22), (4, 5, 0, 2)]
    assert CpuKernel().plan(right, H, 1 << 22) == [(0, 5, 0, 22)]
    assert TorchKernel().plan(right, H, 1 << 22) == [(b, b + 1, 0, T) for b, (_, T) in enumerate(right)]
    left = [(17, 5), (9, 13), (0, 22), (0, 22)]  # only rows that start at 0 share a grid
    assert CpuKernel().plan(left, H, 1 << 22) == [(0, 1, 17, 5), (1, 2, 9, 13), (2, 4, 0, 22)]
    model = tiny_model("llama-gqa", seed=2)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, VOCAB, (1, T), generator=gen) for T in (5, 13, 4, 22, 2)]
    dense = edge_importances_batch(model, seqs)
    sizes = _spy_blocks(monkeypatch)
    got = prediction_stats_batch(model, seqs, TAUS, element_budget=model.config.num_attention_heads * 2 * 13 ** 2)
    assert max(sizes) == 2 and 1 in sizes
    assert sum(_assert_equal_to_dense(d, s, None, TAUS) for d, s in zip(dense, got)) > 0


@pytest.mark.parametrize("case", ["llama-gqa", "neox-parallel", "gemma2"])
def test_the_last_prediction_only(case):
    """predictions="last": the last position's route and top-1 token equal the dense ones; the other
    positions have empty routes and -1; importances are every position's; active_above=None: no pruning."""
    model = tiny_model(case, seed=6, attn="eager" if case == "gemma2" else "sdpa")
    gen = torch.Generator().manual_seed(8)
    seqs = [torch.randint(0, VOCAB, (1, T), generator=gen) for T in (7, 16, 1, 11)]
    dense = edge_importances_batch(model, seqs)
    n_heads = 0
    for padding in ("right", "left"):
        got = prediction_stats_batch(model, seqs, TAUS, predictions="last", active_above=None, padding_side=padding)
        for d, s in zip(dense, got):
            T, L, H = d.n_tokens, d.n_layers, d.n_heads
            np.testing.assert_allclose(s.components, d.component_importance(), atol=1e-6, rtol=0)
            assert s.predicted_ids[-1] == d.predicted_ids[-1] and (s.predicted_ids[:-1] == -1).all()
            assert s.pruned_heads == {}
            for tau in TAUS:
                masks = route_masks(d, tau)
                assert s.route_heads[tau][-1].tolist() == np.flatnonzero(masks.heads.reshape(T, L * H)[-1]).tolist()
                assert s.route_ffn[tau][-1].tolist() == np.flatnonzero(masks.ffn[-1]).tolist()
                assert all(len(r) == 0 for r in s.route_heads[tau][:-1] + s.route_ffn[tau][:-1])
                assert len(s.route_heads[tau]) == len(s.route_ffn[tau]) == T
                n_heads += len(s.route_heads[tau][-1])
    assert n_heads > 0
    ids = seqs[1]
    for bad in ("first", None, ["last"]):
        with pytest.raises(InputError, match="predictions must be one of \\['all', 'last'\\]"):
            prediction_stats(model, ids, 0.04, predictions=bad)


def test_head_outputs_of_a_batch_are_each_sequences_own():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(3, 2, 7, 5, generator=gen)  # [G, H_kv, T, dh]
    w_o = torch.randn(4, 5, 6, generator=gen)  # [H, dh, d]
    batch = head_outputs_of(values, w_o, backend="cpu")
    assert batch.F.shape == (3, 4, 7, 6) and batch.f_max.shape == (3, 4, 7)
    for g in range(3):
        one = head_outputs_of(values[g], w_o, backend="cpu")
        torch.testing.assert_close(batch.F[g], one.F, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(batch.f_max[g], one.f_max, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(head_outputs(values[g], w_o), one.F)


@pytest.mark.parametrize("case", ["llama-gqa", "neox-parallel"])
@pytest.mark.parametrize("taus_at_once", [0, 1, 2])
def test_routes_of_taus_side_by_side_in_groups_or_from_the_sparse_graphs(monkeypatch, case, taus_at_once):
    """The batched route pass takes as many taus at once as its memory bound allows (here 1 or 2 of 3, so
    the last group is short); below one tau's matrices the routes come from each sequence's sparse graph."""
    import flowray.batch_stats as batch_stats

    model = tiny_model(case, seed=3)
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, VOCAB, (1, T), generator=gen) for T in (9, 17, 4)]
    dense = edge_importances_batch(model, seqs)
    calls = []
    real = batch_stats._routes_group
    monkeypatch.setattr(batch_stats, "_routes_group",
                        lambda state, taus, hits: calls.append(len(taus)) or real(state, taus, hits))
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    one_tau = L * len(seqs) * (17 + H + 2) * 17 * 4  # float32 on the CPU
    monkeypatch.setattr(batch_stats, "BATCHED_ROUTES_BYTES", max(1, one_tau * taus_at_once))
    got = prediction_stats_batch(model, seqs, TAUS)
    assert calls == {0: [], 1: [1, 1, 1], 2: [2, 1]}[taus_at_once]
    assert sum(_assert_equal_to_dense(d, s, None, TAUS) for d, s in zip(dense, got)) > 0


def test_routes_at_large_taus_stop_at_block_nodes_that_pass_nothing_on():
    """Above tau = 0.5 both parts of an FFN's block node can fall at or below tau: the route stops there,
    and the batched pass must not reach the attention node below it."""
    model = tiny_model("llama-gqa", seed=3)
    gen = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, VOCAB, (1, T), generator=gen) for T in (15, 8, 21)]
    dense = edge_importances_batch(model, seqs)
    stopped = sum(int(((d.ffn <= 0.55) & (d.ffn_residual <= 0.55)).sum()) for d in dense)
    assert stopped > 0, "no block node stops a route at this tau: the test would not test it"
    taus = (0.3, 0.55, 0.7)
    got = prediction_stats_batch(model, seqs, taus)
    assert sum(_assert_equal_to_dense(d, s, None, taus) for d, s in zip(dense, got)) > 0
