"""The fast importance path equals the naive materialising reference; invariants; failure modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flowray
from flowray.errors import InputError, UnsupportedArchitectureError
from flowray.importance import normalise, proximity, sub_edge_proximity
from reference import reference_importances
from tiny_models import CASES, VOCAB, tiny_model

TOL = 1e-5


def _ids(T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(seed))


def _assert_close(got, ref):
    for name in ("attn", "attn_residual", "ffn"):
        np.testing.assert_allclose(getattr(got, name), ref[name], atol=TOL, rtol=0, err_msg=name)
    if ref["ffn_residual"] is None:
        assert got.ffn_residual is None
    else:
        np.testing.assert_allclose(got.ffn_residual, ref["ffn_residual"], atol=TOL, rtol=0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("T", [7, 13])
def test_matches_naive_reference(case, T):
    model = tiny_model(case, seed=T)
    ids = _ids(T, seed=T)
    ref = reference_importances(model, ids)
    # the reference's parts add up to what the attention module really output (it read the weights itself)
    assert ref["decomposition_error"] < 1e-4
    _assert_close(flowray.edge_importances(model, ids), ref)


@pytest.mark.parametrize("case", ["llama-gqa", "neox-parallel", "gpt2"])
def test_chunking_and_budgets_do_not_change_results(case):
    model = tiny_model(case, seed=3)
    ids = _ids(11, seed=4)
    ref = reference_importances(model, ids)
    for kw in (dict(chunk_size=1), dict(chunk_size=4, element_budget=7), dict(chunk_size=3, element_budget=1)):
        _assert_close(flowray.edge_importances(model, ids, **kw), ref)


def _naive_sub_edges(y, probs, values, w_o):
    H, T, _ = probs.shape
    F = torch.bmm(values.double().repeat_interleave(H // values.shape[0], 0), w_o.double())  # [H, T, d]
    Z = probs.double()[:, :, :, None] * F[:, None, :, :]  # [H, pos, j, d]
    y = y.double()
    prox = (y.abs().sum(-1)[None, :, None] - (y[None, :, None, :] - Z).abs().sum(-1)).clamp_min(0)
    return prox * torch.ones(T, T, dtype=torch.float64).tril()


@pytest.mark.parametrize("seed", range(12))
def test_kernel_on_random_tensors_of_odd_sizes(seed):
    """Random shapes, exact zeros in y (the sign(0) case), every branch: no/ragged/dense correction."""
    g = torch.Generator().manual_seed(seed)
    H, H_kv = [(1, 1), (3, 3), (6, 2), (9, 3)][seed % 4]
    T = int(torch.randint(1, 23, (1,), generator=g))
    d = int(torch.randint(1, 97, (1,), generator=g))
    dh = int(torch.randint(1, 9, (1,), generator=g))
    y = torch.randn(T, d, generator=g) * (0.1 + 3 * float(torch.rand(1, generator=g)))
    y[torch.rand(T, d, generator=g) < 0.15] = 0.0
    logits = torch.randn(H, T, T, generator=g) * 3
    probs = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    values = torch.randn(H_kv, T, dh, generator=g)
    w_o = torch.randn(H, dh, d, generator=g)
    ref = _naive_sub_edges(y, probs, values, w_o)
    scale = y.double().abs().sum(-1)[None, :, None] + 1e-12  # errors relative to the node's l1 norm
    for kw in (dict(), dict(dense_rank=0), dict(dense_rank=2), dict(dense_rank=3, chunk_size=2, element_budget=5),
               dict(dense_rank=10_000, chunk_size=1, element_budget=1)):
        got = sub_edge_proximity(y, probs, values, w_o, **kw).double()
        assert float(((got - ref).abs() / scale).max()) < 1e-5, kw
        assert torch.all(got.triu(1) == 0)  # future positions are not parts


def test_hand_computed_node():
    """y = (3, -1) with parts z1 = (2, 0), z2 = (1, -1): prox = 4 - 2 = 2 and 4 - 2 = 2 -> 1/2 each."""
    y = torch.tensor([[3.0, -1.0]])
    parts = torch.tensor([[[2.0, 0.0]], [[1.0, -1.0]]])
    assert proximity(parts, y).tolist() == [[2.0], [2.0]]
    # a part pointing away from y has proximity 0: ||y|| - ||y - z|| = 4 - 6 < 0
    assert proximity(torch.tensor([[[-1.0, 1.0]]]), y).tolist() == [[0.0]]
    assert normalise(None, proximity(parts, y)).direct.tolist() == [[0.5], [0.5]]


def test_all_zero_proximity_gives_zero_not_nan():
    sub = torch.zeros(2, 3, 3)
    direct = torch.zeros(1, 3)
    out = normalise(sub, direct)
    assert torch.equal(out.attn, sub) and torch.equal(out.direct, direct)


@pytest.mark.parametrize("case", ["opt", "llama-gqa", "neox-parallel", "neox-sequential"])
def test_parts_of_every_node_sum_to_one(case):
    imp = flowray.edge_importances(tiny_model(case, seed=1), _ids(9, seed=2))
    attn_node = imp.attn.sum(axis=(1, 3)) + imp.attn_residual
    if imp.parallel:
        attn_node = attn_node + imp.ffn
    else:
        np.testing.assert_allclose(imp.ffn + imp.ffn_residual, 1.0, atol=1e-5)
    np.testing.assert_allclose(attn_node, 1.0, atol=1e-5)
    assert np.all(np.triu(imp.attn, 1) == 0)
    assert imp.component_importance().shape == (9, imp.n_layers * imp.n_heads + imp.n_layers)


def test_hooks_are_removed_and_attention_restored():
    model = tiny_model("llama-gqa")
    model.set_attn_implementation("sdpa")
    flowray.edge_importances(model, _ids(5, 0))
    assert model.config._attn_implementation == "sdpa"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(InputError):
        flowray.edge_importances(model, torch.full((1, 5), VOCAB + 3))  # id out of range: before any hook
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_bad_inputs():
    model = tiny_model("gpt2")
    with pytest.raises(InputError, match=r"shape \[1, T\]"):
        flowray.edge_importances(model, torch.tensor([1, 2, 3]))
    with pytest.raises(InputError, match="one sequence"):
        flowray.edge_importances(model, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(InputError, match="context of 64"):
        flowray.edge_importances(model, torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(InputError, match="chunk_size"):
        flowray.edge_importances(model, torch.ones(1, 3, dtype=torch.long), chunk_size=0)


def test_unsupported_architectures_fail_fast_with_the_supported_list():
    import transformers as tf

    gptj = tf.GPTJForCausalLM(tf.GPTJConfig(n_layer=1, n_head=2, n_embd=8, rotary_dim=2, vocab_size=11))
    with pytest.raises(UnsupportedArchitectureError, match="'gptj'.*supported families: llama"):
        flowray.edge_importances(gptj, torch.ones(1, 3, dtype=torch.long))
    post_ln = tf.OPTForCausalLM(tf.OPTConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=8,
                                             ffn_dim=8, do_layer_norm_before=False, vocab_size=11,
                                             word_embed_proj_dim=8))
    with pytest.raises(UnsupportedArchitectureError, match="do_layer_norm_before=False"):
        flowray.edge_importances(post_ln, torch.ones(1, 3, dtype=torch.long))


def test_save_and_load_round_trip(tmp_path):
    imp = flowray.edge_importances(tiny_model("neox-parallel"), _ids(6, 1))
    path = imp.save(tmp_path / "x.npz")
    back = flowray.EdgeImportances.load(path)
    assert back.ffn_residual is None and back.parallel
    np.testing.assert_array_equal(back.attn, imp.attn)
    np.testing.assert_array_equal(back.token_ids, imp.token_ids)


def test_the_benchmarked_materialising_algorithm_matches_the_reference():
    """bench/ times reference.materialising_importances; make sure it computes the same thing."""
    from reference import materialising_importances

    model = tiny_model("llama-gqa", seed=9)
    ids = _ids(10, seed=9)
    ref = reference_importances(model, ids)
    got = materialising_importances(model, ids)
    for name in ("attn", "attn_residual", "ffn", "ffn_residual"):
        np.testing.assert_allclose(got[name], ref[name], atol=TOL, rtol=0, err_msg=name)


@pytest.mark.parametrize("case", ["gpt2", "mistral", "neox-parallel"])
def test_batched_right_padded_pass_equals_single_passes(case):
    model = tiny_model(case, seed=4)
    seqs = [_ids(T, seed=T) for T in (5, 12, 1, 9)]
    batch = flowray.api.edge_importances_batch(model, seqs)
    for ids, got in zip(seqs, batch):
        ref = reference_importances(model, ids)
        _assert_close(got, ref)
        np.testing.assert_array_equal(got.token_ids, ids[0].numpy())
