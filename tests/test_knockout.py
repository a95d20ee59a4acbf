"""Attention knockout (flowray.baselines.knockout), checked three ways: no pair = the plain eager forward bit
for bit; against a hook-based reference on every family (subtract ``alpha_ij * v_j W_O^h`` from the
attention output, layer by layer); and against hand-written GPT-2 and Llama forwards that zero the weight
themselves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_baselines import _ids, _logits
from tiny_models import CASES, tiny_model
from torch import nn

from flowray import baselines as bl
from flowray.errors import FlowrayError, InputError
from flowray.models.families import adapter_for


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
