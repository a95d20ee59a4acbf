"""Patching baselines: knockout, head patching and ablation are exact interventions; the comparison report.

Knockout is checked three ways: no pair = the plain eager forward bit for bit; against a hook-based
reference on every family (subtract ``alpha_ij * v_j W_O^h`` from the attention output, layer by layer);
and against hand-written GPT-2 and Llama forwards that zero the weight themselves.
"""

from __future__ import annotations

import argparse
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from flowray import baselines as bl
from flowray.baselines import rank_heads, rankdata, spearman, top_k
from flowray.errors import FlowrayError, InputError
from flowray.models.families import adapter_for
from flowray.routes import route_flows
from tiny_models import CASES, VOCAB, tiny_model


def _ids(B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


# --- attention knockout ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_knockout_without_pairs_is_the_plain_forward(case):
    model = tiny_model(case)
    adapter = adapter_for(model)
    ids = _ids(3, 9, seed=1)
    plain = _logits(model, ids)
    with bl.attention_knockout(model, adapter):
        assert model.config._attn_implementation == bl.KNOCKOUT_IMPLEMENTATION
        inside = _logits(model, ids)
    assert torch.equal(plain, inside)
    assert model.config._attn_implementation == "eager"
    assert not bl._PLANS


@torch.no_grad()
def _hook_reference(model, adapter, ids, pairs):
    """Knockout by linearity: subtract ``alpha_ij^h v_j^h W_O^h`` from each attention output (eager model)."""
    s = adapter.shape
    handles, state = [], {}
    for layer in adapter.layers():
        w_o, _ = adapter.output_projection(layer)  # [H, dh, d]

        def on_values(_m, _a, out):
            state["v"] = adapter.values_from(out[0] if isinstance(out, tuple) else out)  # [B, T, Hkv, dh]

        def on_attention(_m, _a, out, w_o=w_o):
            attn_out, probs = out[0].clone(), out[1]
            for r, i, j in pairs:
                for h in range(s.n_heads):
                    v = state["v"][r, j, h // s.kv_group]  # [dh]
                    attn_out[r, i] -= probs[r, h, i, j] * (v @ w_o[h])
            return (attn_out, *out[1:])

        handles.append(adapter.value_module(layer).register_forward_hook(on_values))
        handles.append(adapter.attention(layer).register_forward_hook(on_attention))
    try:
        return _logits(model, ids)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("case", CASES)
def test_knockout_matches_the_linear_reference(case):
    model = tiny_model(case, seed=2)
    adapter = adapter_for(model)
    ids = _ids(3, 8, seed=2)
    pairs = [(0, 5, 2), (0, 7, 0), (2, 3, 1), (2, 7, 6)]  # row 1 untouched; row 0 and 2 two pairs each
    with bl.attention_knockout(model, adapter, pairs):
        got = _logits(model, ids)
    ref = _hook_reference(model, adapter, ids, pairs)
    plain = _logits(model, ids)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    assert torch.equal(got[1], plain[1])  # a row without pairs is the plain forward
    assert (got[0] - plain[0]).abs().max() > 1e-3  # the intervention does something


def _zeroed_softmax(scores: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """Causal softmax over [H, T, T] scores, then weight (i, j) set to 0 in every head, no renormalising."""
    T = scores.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    if i is not None:
        probs[:, i, j] = 0.0
    return probs


@torch.no_grad()
def _gpt2_by_hand(model, ids: torch.Tensor, i=None, j=None) -> torch.Tensor:
    """GPT-2 forward written out (one sequence), with the attention weight (i, j) zeroed in every head."""
    cfg, tr = model.config, model.transformer
    H, d = cfg.n_head, cfg.n_embd
    dh = d // H
    T = ids.shape[1]
    x = tr.wte.weight[ids[0]] + tr.wpe.weight[:T]  # [T, d]

    def ln(x, m):
        return nn.functional.layer_norm(x, (d,), m.weight, m.bias, cfg.layer_norm_epsilon)

    def gelu_new(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))

    for block in tr.h:
        a = ln(x, block.ln_1) @ block.attn.c_attn.weight + block.attn.c_attn.bias  # [T, 3d]
        q, k, v = (t.view(T, H, dh).transpose(0, 1) for t in a.split(d, dim=1))  # [H, T, dh]
        probs = _zeroed_softmax(q @ k.transpose(1, 2) / math.sqrt(dh), i, j)
        heads = (probs @ v).transpose(0, 1).reshape(T, d)
        x = x + heads @ block.attn.c_proj.weight + block.attn.c_proj.bias
        m = gelu_new(ln(x, block.ln_2) @ block.mlp.c_fc.weight + block.mlp.c_fc.bias)
        x = x + m @ block.mlp.c_proj.weight + block.mlp.c_proj.bias
    return ln(x, tr.ln_f) @ model.lm_head.weight.T  # [T, V]


@torch.no_grad()
def _llama_by_hand(model, ids: torch.Tensor, i=None, j=None) -> torch.Tensor:
    """Llama forward written out (one sequence, GQA, rotary), with the attention weight (i, j) zeroed."""
    cfg, core = model.config, model.model
    H, Hkv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    T = ids.shape[1]
    x = core.embed_tokens.weight[ids[0]]  # [T, d]

    def rms(x, m):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * m.weight

    inv_freq = core.rotary_emb.inv_freq.float()  # [dh/2], the model's rotary table
    angles = torch.arange(T).float()[:, None] * inv_freq[None]  # [T, dh/2]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()  # [T, dh]

    def rope(t):  # [h, T, dh]
        half = t.shape[-1] // 2
        rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
        return t * cos + rotated * sin

    for layer in core.layers:
        at = layer.self_attn
        hs = rms(x, layer.input_layernorm)
        q = rope((hs @ at.q_proj.weight.T).view(T, H, dh).transpose(0, 1))  # [H, T, dh]
        k = rope((hs @ at.k_proj.weight.T).view(T, Hkv, dh).transpose(0, 1))  # [Hkv, T, dh]
        v = (hs @ at.v_proj.weight.T).view(T, Hkv, dh).transpose(0, 1)
        k, v = k.repeat_interleave(H // Hkv, 0), v.repeat_interleave(H // Hkv, 0)  # head h reads kv h // group
        probs = _zeroed_softmax(q @ k.transpose(1, 2) / math.sqrt(dh), i, j)
        x = x + (probs @ v).transpose(0, 1).reshape(T, H * dh) @ at.o_proj.weight.T
        hs = rms(x, layer.post_attention_layernorm)
        mlp = layer.mlp
        x = x + (nn.functional.silu(hs @ mlp.gate_proj.weight.T) * (hs @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    return rms(x, core.norm) @ model.lm_head.weight.T


@pytest.mark.parametrize("case, by_hand", [("gpt2", _gpt2_by_hand), ("llama-gqa", _llama_by_hand)])
@pytest.mark.parametrize("i, j", [(6, 2), (4, 0), (9, 8)])
def test_knockout_matches_a_hand_written_forward(case, by_hand, i, j):
    model = tiny_model(case, seed=5)
    adapter = adapter_for(model)
    ids = _ids(1, 10, seed=5)
    plain = _logits(model, ids)[0]
    torch.testing.assert_close(by_hand(model, ids), plain, atol=1e-4, rtol=1e-5)  # the reference is right
    with bl.attention_knockout(model, adapter, [(0, i, j)]):
        got = _logits(model, ids)[0]
    want = by_hand(model, ids, i, j)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert (want - plain).abs().max() > 1e-2
    # positions before i cannot see the intervention
    torch.testing.assert_close(got[:i], plain[:i], atol=0, rtol=0)


def test_knockout_weights_are_zero_and_not_renormalised():
    model = tiny_model("llama-gqa", seed=1)
    adapter = adapter_for(model)
    ids = _ids(2, 7, seed=3)
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False, output_attentions=True).attentions[0]
        with bl.attention_knockout(model, adapter, [(1, 5, 3)]):
            knocked = model(input_ids=ids, use_cache=False, output_attentions=True).attentions[0]
    assert torch.all(knocked[1, :, 5, 3] == 0)
    expected = plain.clone()
    expected[1, :, 5, 3] = 0
    assert torch.equal(knocked, expected)  # layer 0: everything else unchanged, row 5 sums to < 1
    torch.testing.assert_close(knocked[1, :, 5].sum(-1), 1 - plain[1, :, 5, 3])  # the rest is not rescaled


def test_knockout_only_in_chosen_layers():
    model = tiny_model("gpt2", seed=4)
    adapter = adapter_for(model)
    ids = _ids(1, 8, seed=4)
    with bl.attention_knockout(model, adapter, [(0, 6, 1)], layers=[]):
        none = _logits(model, ids)
    with bl.attention_knockout(model, adapter, [(0, 6, 1)], layers=[1]):
        one = _logits(model, ids)
    with bl.attention_knockout(model, adapter, [(0, 6, 1)]):
        every = _logits(model, ids)
    plain = _logits(model, ids)
    assert torch.equal(none, plain)
    assert not torch.allclose(one, plain) and not torch.allclose(one, every)


def test_knockout_restores_the_model_on_error():
    model = tiny_model("qwen2")
    adapter = adapter_for(model)
    with pytest.raises(RuntimeError, match="boom"), bl.attention_knockout(model, adapter, [(0, 2, 1)]):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "eager"
    assert not bl._PLANS
    with pytest.raises(InputError, match="source j <= query i"), bl.attention_knockout(model, adapter, [(0, 1, 2)]):
        pass
    assert model.config._attn_implementation == "eager"
    with pytest.raises(InputError, match="outside the batch"), bl.attention_knockout(model, adapter, [(0, 20, 1)]):
        _logits(model, _ids(1, 5, 0))
    assert not bl._PLANS


def test_knockout_sweep_matches_single_knockouts():
    model = tiny_model("mistral", seed=6)
    adapter = adapter_for(model)
    ids = _ids(2, 5, seed=6)
    answer, wrong = torch.tensor([3, 4]), torch.tensor([7, 9])
    res = bl.knockout_sweep(model, adapter, ids, answer, wrong, batch_size=3)  # batches cross prompts
    assert res.ld_knocked.shape == (2, 5, 5)
    assert np.isnan(res.ld_knocked[:, np.triu_indices(5)[0], np.triu_indices(5)[1]]).all()
    for p, i, j in [(0, 1, 0), (0, 4, 2), (1, 3, 1), (1, 4, 3)]:
        with bl.attention_knockout(model, adapter, [(0, i, j)]):
            logits = _logits(model, ids[p : p + 1])[0, -1]
        assert res.ld_knocked[p, i, j] == pytest.approx(float(logits[answer[p]] - logits[wrong[p]]), abs=1e-5)
    plain = _logits(model, ids)[:, -1]
    np.testing.assert_allclose(res.ld_clean, (plain[[0, 1], answer] - plain[[0, 1], wrong]).numpy(), atol=1e-5)
    np.testing.assert_allclose(res.delta[0, 1, 0], res.ld_clean[0] - res.ld_knocked[0, 1, 0])


# --- head patching -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["gpt2", "llama-gqa", "neox-parallel", "opt"])
def test_patching_with_the_clean_runs_own_heads_changes_nothing(case):
    model = tiny_model(case, seed=7)
    adapter = adapter_for(model)
    s = adapter.shape
    ids = _ids(2, 6, seed=7)
    acts, logits = bl.head_outputs(model, adapter, ids)
    assert acts.shape == (s.n_layers, 2, 6, s.n_heads, s.head_dim)
    grid = torch.cartesian_prod(torch.arange(2), torch.arange(s.n_layers), torch.arange(s.n_heads))
    with bl.replace_heads(model, adapter, grid[:, 0], grid[:, 1], grid[:, 2], source=acts, source_rows=grid[:, 0]):
        patched = bl.last_logits(model, ids)
    torch.testing.assert_close(patched, logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, bl.last_logits(model, ids), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, _logits(model, ids)[:, -1], atol=1e-5, rtol=1e-6)  # all-position head


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa", "neox-parallel", "qwen2"])
def test_patching_every_head_of_a_layer_equals_patching_the_attention_output(case):
    """All heads of layer l from the corrupted run = the layer's whole attention output from that run."""
    model = tiny_model(case, seed=8)
    adapter = adapter_for(model)
    s = adapter.shape
    clean, corrupt = _ids(1, 7, seed=8), _ids(1, 7, seed=9)
    l = s.n_layers - 2
    attention = adapter.attention(adapter.layers()[l])
    saved = {}
    handle = attention.register_forward_hook(lambda m, a, o: saved.__setitem__("out", o[0].clone()))
    _logits(model, corrupt)
    handle.remove()
    handle = attention.register_forward_hook(lambda m, a, o: (saved["out"], *o[1:]))
    try:
        want = _logits(model, clean)[0, -1]
    finally:
        handle.remove()
    acts, _ = bl.head_outputs(model, adapter, corrupt)
    heads = torch.arange(s.n_heads)
    with bl.replace_heads(model, adapter, torch.zeros_like(heads), torch.full_like(heads, l), heads,
                          source=acts, source_rows=torch.zeros_like(heads)):
        got = bl.last_logits(model, clean)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
    assert (got - _logits(model, clean)[0, -1]).abs().max() > 1e-3


def test_patching_sweep_bookkeeping():
    model = tiny_model("llama-bias", seed=10)
    adapter = adapter_for(model)
    s = adapter.shape
    clean, corrupt = _ids(3, 6, seed=10), _ids(3, 6, seed=11)
    answer, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    res = bl.patching_sweep(model, adapter, clean, corrupt, answer, wrong, batch_size=5)
    assert res.ld_patched.shape == (3, s.n_layers, s.n_heads)

    def ld(logits, p):
        return float(logits[answer[p]] - logits[wrong[p]])

    acts, corrupt_logits = bl.head_outputs(model, adapter, corrupt)
    for p in range(3):
        assert res.ld_corrupt[p] == pytest.approx(ld(corrupt_logits[p], p), abs=1e-5)
        assert res.ld_clean[p] == pytest.approx(ld(_logits(model, clean)[p, -1], p), abs=1e-5)
    for p, l, h in [(0, 0, 0), (1, 1, 2), (2, 0, 1)]:
        with bl.replace_heads(model, adapter, [0], [l], [h], source=acts, source_rows=[p]):
            logits = bl.last_logits(model, clean[p : p + 1])[0]
        assert res.ld_patched[p, l, h] == pytest.approx(ld(logits, p), abs=1e-5)
    effect = res.effect()
    np.testing.assert_allclose(
        effect, (res.ld_clean[:, None, None] - res.ld_patched).mean(0) / (res.ld_clean - res.ld_corrupt).mean(),
        rtol=1e-6,
    )


def test_patching_rejects_twins_of_different_lengths():
    model = tiny_model("gpt2")
    adapter = adapter_for(model)
    with pytest.raises(InputError, match="same shape"):
        bl.patching_sweep(model, adapter, _ids(2, 5, 0), _ids(2, 6, 0), [1, 2], [3, 4])
    with pytest.raises(InputError, match="one token id per prompt"):
        bl.patching_sweep(model, adapter, _ids(2, 5, 0), _ids(2, 5, 1), [1], [3, 4])


# --- ablation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["gpt2", "llama-gqa", "neox-sequential", "opt"])
def test_ablating_no_heads_is_the_identity(case):
    model = tiny_model(case, seed=12)
    adapter = adapter_for(model)
    ids = _ids(2, 6, seed=12)
    plain = bl.last_logits(model, ids)
    assert torch.equal(bl.ablate_heads(model, adapter, ids, [], mode="zero"), plain)
    means = bl.head_means(model, adapter, ids[:1])
    assert torch.equal(bl.ablate_heads(model, adapter, ids, [], mode="mean", means=means), plain)


def _zero_w_o_slice(model, adapter, l: int, h: int):
    """A copy of ``model`` whose W_O ignores head (l, h): its input slice's weights set to zero."""
    model = copy.deepcopy(model)
    adapter = adapter_for(model)
    w_o = adapter.head_output_module(adapter.layers()[l])
    dh = adapter.shape.head_dim
    with torch.no_grad():
        if isinstance(w_o, nn.Linear):  # weight [d, H * dh]
            w_o.weight[:, h * dh : (h + 1) * dh] = 0
        else:  # GPT-2 Conv1D weight [H * dh, d]
            w_o.weight[h * dh : (h + 1) * dh, :] = 0
    return model


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa", "neox-parallel", "qwen2"])
def test_zero_ablating_a_head_equals_zeroing_its_w_o_slice(case):
    model = tiny_model(case, seed=13)
    adapter = adapter_for(model)
    ids = _ids(2, 7, seed=13)
    l, h = 1, adapter.shape.n_heads - 1
    got = bl.ablate_heads(model, adapter, ids, [(l, h)], mode="zero")
    want = _logits(_zero_w_o_slice(model, adapter, l, h), ids)[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
    assert (got - _logits(model, ids)[:, -1]).abs().max() > 1e-4


def test_mean_ablation_uses_the_reference_mean_and_per_row_masks():
    model = tiny_model("llama-gqa", seed=14)
    adapter = adapter_for(model)
    ids, ref = _ids(2, 6, seed=14), _ids(4, 6, seed=15)
    means = bl.head_means(model, adapter, ref)
    acts, _ = bl.head_outputs(model, adapter, ref)
    torch.testing.assert_close(means, acts.mean(1))
    # mean-ablating with the prompt's own outputs as the "mean" changes nothing
    own, _ = bl.head_outputs(model, adapter, ids[:1])
    same = bl.ablate_heads(model, adapter, ids[:1], [(0, 1), (2, 5)], mode="mean", means=own[:, 0])
    torch.testing.assert_close(same, _logits(model, ids[:1])[:, -1], atol=1e-6, rtol=0)
    # per-row masks in one batch equal separate calls
    masks = torch.zeros(2, adapter.shape.n_layers, adapter.shape.n_heads, dtype=torch.bool)
    masks[0, 0, 1] = True
    masks[1, 2, 3] = masks[1, 1, 0] = True
    both = bl.ablate_heads(model, adapter, ids, masks, mode="mean", means=means)
    for r in range(2):
        alone = bl.ablate_heads(model, adapter, ids[r : r + 1], masks[r], mode="mean", means=means)
        torch.testing.assert_close(both[r : r + 1], alone, atol=1e-5, rtol=1e-6)
    answer, wrong = torch.tensor([1, 2]), torch.tensor([3, 4])
    sweep = bl.ablation_sweep(model, adapter, ids, masks, answer, wrong, mode="mean", means=means, batch_size=3)
    for c in range(2):
        logits = bl.ablate_heads(model, adapter, ids, masks[c], mode="mean", means=means)
        np.testing.assert_allclose(sweep[c], bl.logit_diff(logits, answer, wrong).numpy(), atol=1e-5)


def test_ablation_input_errors():
    model = tiny_model("gpt2")
    adapter = adapter_for(model)
    ids = _ids(1, 5, 0)
    with pytest.raises(InputError, match="mode must be one of"):
        bl.ablate_heads(model, adapter, ids, [(0, 0)], mode="resample")
    with pytest.raises(InputError, match="needs means"):
        bl.ablate_heads(model, adapter, ids, [(0, 0)], mode="mean")
    with pytest.raises(InputError, match="outside the model"):
        bl.ablate_heads(model, adapter, ids, [(9, 0)], mode="zero")
    with pytest.raises(InputError, match=r"shape \[B, T\]"):
        bl.ablate_heads(model, adapter, ids[0], [(0, 0)], mode="zero")


# --- comparison maths -------------------------------------------------------------------------------------
def test_rank_statistics_by_hand():
    np.testing.assert_allclose(rankdata([10, 30, 20, 20]), [1, 4, 2.5, 2.5])
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks a = [1, 2, 3], b = [1, 3, 2]: rho = 1 - 6 * 2 / (3 * 8) = 0.5
    assert spearman([0.1, 0.5, 0.9], [1, 7, 3]) == pytest.approx(0.5)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert top_k(np.array([0.3, 0.0, 0.9, 0.0]), 3, positive_only=True) == {0, 2}
    assert top_k(np.array([1, 5, 5, 2]), 2) == {1, 2}
    assert rank_heads(np.array([[0.5, 1.0], [1.0, 0.2]]), np.array([[0, 0], [3, 0]]))[:2] == [(1, 0), (0, 1)]


def test_route_flows_by_hand():
    """A one-layer route: top <- (ffn .6, residual .4) <- attn node <- (self .5, token 0 via heads .3 + .2)."""
    from flowray.routes import Edge, EdgeKind, HeadImportance, Node, NodeKind, Route

    top, mid = Node(0, 1, NodeKind.BLOCK), Node(0, 1, NodeKind.ATTN)
    e0, e1 = Node(0, 0, NodeKind.EMBED), Node(0, 1, NodeKind.EMBED)
    edges = (
        Edge(mid, top, EdgeKind.FFN, 0.6),
        Edge(mid, top, EdgeKind.RESIDUAL, 0.4),
        Edge(e1, mid, EdgeKind.RESIDUAL, 0.5),
        Edge(e0, mid, EdgeKind.ATTENTION, 0.5, (HeadImportance(1, 0.3), HeadImportance(0, 0.2))),
    )
    route = Route(position=1, tau=0.1, n_layers=1, n_heads=2, parallel=False, tokens=("a", "b"),
                  nodes=(e0, e1, mid, top), edges=edges)
    head_flow, pair_flow, pair_imp = route_flows(route, 2)
    # the attn node receives all of the top's weight (0.6 + 0.4), then passes 0.5 of it to token 0
    np.testing.assert_allclose(head_flow, [[0.2, 0.3]])
    np.testing.assert_allclose(pair_flow, [[0, 0], [0.5, 0]])
    np.testing.assert_allclose(pair_imp, [[0, 0], [0.5, 0]])


# --- the comparison run, end to end on a tiny model ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_lm(smollm2):
    """A tiny random Llama with SmolLM2's tokenizer (vocabulary 49152, d = 16)."""
    import transformers as tf

    from flowray.models.loading import LoadedModel

    cfg = tf.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                         hidden_size=16, intermediate_size=24, vocab_size=len(smollm2.tokenizer),
                         max_position_embeddings=64)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than HF's init, so logit differences are not ~0
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    return LoadedModel(model=model, tokenizer=smollm2.tokenizer, adapter=adapter_for(model), name="tiny-llama")


def test_run_comparison_writes_the_report(tiny_lm, tmp_path):
    from flowray.baselines import run_comparison, write_report

    summary = run_comparison(tiny_lm, n=4, seed=1, out_dir=tmp_path, tau=0.05, ks=(1, 3, 100), random_draws=2,
                             progress=False, top=3, batch_size=32, reference_n=4)
    for name in ("report.md", "summary.json", "arrays.npz", "faithfulness.png", "heads_grid.png",
                 "heads_scatter.png", "pairs_example.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    report = (tmp_path / "report.md").read_text()
    for section in ("## Setup", "## Time", "## Agreement: heads", "## Agreement: token-to-token connections",
                    "## Faithfulness", "## Discussion", "## Figures"):
        assert section in report, section
    assert "torch threads" in report and "run_comparison(model='tiny-llama', n=4" in report
    t = summary["timing"]
    P = summary["n_used"]
    assert P == 4 and t["patching_forward_passes"] == P * 2 * 4
    assert all(t[k] > 0 for k in ("routes_batched_s", "routes_s", "patching_s", "knockout_s", "eap_s"))
    for method in ("patching", "knockout", "eap"):  # stable keys; the headline is over the batched routes
        assert t["ratios"][method] == pytest.approx(t[f"{method}_s"] / t["routes_batched_s"])
        assert t["ratios_unbatched_cpu"][method] == pytest.approx(t[f"{method}_cpu_s"] / t["routes_cpu_s"])
        assert f"**{t['ratios'][method]:.1f}x**" in report
    split = t["split_per_prompt_s"]
    parts = ("forward", "importances", "routes", "python_overhead", "outside_split")
    assert sum(split[k] for k in parts) == pytest.approx(split["total"]) and split["forward"] > 0
    assert t["routes_batched_same_heads"]  # the batched statistics give the one-prompt routes' heads
    assert 0 <= summary["heads"]["overlap_diff_vs_patching"] <= 3
    assert 0 <= summary["heads"]["overlap_eap_vs_patching"] <= 3
    assert summary["faithfulness"]["ks"] == [1, 3]  # k = 100 > 2 layers x 4 heads is dropped
    curves = summary["faithfulness"]["curves"]
    assert set(curves) == {"routes: activation frequency", "routes: contrastive frequency difference",
                           "patching effect", "EAP (attribution patching)", "random"}
    arrays = np.load(tmp_path / "arrays.npz")
    assert arrays["patching_effect"].shape == arrays["eap_effect"].shape == (2, 4)
    assert write_report(tmp_path).read_text() == report  # summary.json holds everything the report shows


def test_cli_registers_compare(tmp_path):
    from flowray.cli import register_compare

    parser = argparse.ArgumentParser()
    register_compare(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--n", "3", "--ks", "1,4", "--out", str(tmp_path), "--no-progress"])
    assert args.n == 3 and args.ks == (1, 4) and callable(args.handler)
    with pytest.raises(SystemExit):
        parser.parse_args(["compare", "--ks", "0,x"])


def test_knockout_outside_its_context_is_refused():
    model = tiny_model("llama-gqa")
    adapter = adapter_for(model)
    with bl.attention_knockout(model, adapter):
        pass
    bl.register_attention(bl.KNOCKOUT_IMPLEMENTATION, bl._knockout_attention, "eager")  # registered already
    model.set_attn_implementation(bl.KNOCKOUT_IMPLEMENTATION)
    try:
        with pytest.raises(FlowrayError, match="outside"):
            _logits(model, _ids(1, 4, 0))
    finally:
        model.set_attn_implementation("eager")
