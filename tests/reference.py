"""The exact, naive reference: materialise every sub-edge vector (the official algorithm), in float64.

Written apart from flowray's capture and adapters on purpose: it reads each family's weights itself,
recomputes the value vectors from the attention norm's output, and checks that the parts it builds add up
to the node the model really computed (so a wrong slice of W_V or W_O cannot agree with flowray by
accident). Memory grows as T^2 * H * d: only for tiny models and short sequences (and bench/).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class _Layer:
    """One block as the reference reads it, from the HF modules (not from flowray's adapters)."""

    layer: torch.nn.Module
    attention: torch.nn.Module  # returns (W_O output incl. bias, weights)
    value_input: torch.nn.Module | None  # the module whose output the values are computed from (None: layer input)
    Wv: torch.Tensor  # [Hkv, d, dh]
    bv: torch.Tensor | None  # [Hkv, dh]
    Wo: torch.Tensor  # [H, dh, d]
    bo: torch.Tensor | None  # [d]
    parallel: bool
    ffn: torch.nn.Module  # its output is what the FFN adds to the residual
    post_norm: torch.nn.Module | None = None  # RMSNorm between attention output and residual add
    post_gain: torch.Tensor | None = None  # [d] gamma of post_norm
    post_eps: float = 0.0
    clip_v: float | None = None  # OLMoE's clip_qkv


LLAMA_LIKE = ("llama", "mistral", "qwen2", "gemma", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gemma2",
              "gemma3_text", "olmo2", "olmo3", "phi3")


def _family(model) -> list[_Layer]:
    cfg = model.config
    t = cfg.model_type
    blocks = None
    if t == "gemma3":  # image-text Gemma 3: its language model is Gemma 3 text
        cfg, blocks = cfg.text_config, model.model.language_model.layers
        t = cfg.model_type

    def lin_v(w, b, n_kv, dh):
        w = w.detach().double()  # [n_kv*dh, d]
        W = w.view(n_kv, dh, -1).transpose(1, 2)  # [n_kv, d, dh]
        return W, None if b is None else b.detach().double().view(n_kv, dh)

    def lin_o(lin, n_h, dh):
        w = lin.weight.detach().double()  # [d, n_h*dh]
        return w.T.reshape(n_h, dh, -1), None if lin.bias is None else lin.bias.detach().double()

    out = []
    if t in LLAMA_LIKE:
        H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
        for layer in model.model.layers if blocks is None else blocks:
            a = layer.self_attn
            if t == "phi3":  # fused [q | k | v] rows
                start = (H + Hkv) * dh
                Wv, bv = lin_v(a.qkv_proj.weight[start:], None, Hkv, dh)
            else:
                Wv, bv = lin_v(a.v_proj.weight, a.v_proj.bias, Hkv, dh)
            entry = _Layer(layer, a, getattr(layer, "input_layernorm", None), Wv, bv, *lin_o(a.o_proj, H, dh), False,
                           getattr(layer, "post_feedforward_layernorm", None) or layer.mlp,
                           clip_v=getattr(cfg, "clip_qkv", None) if t == "olmoe" else None)
            if t in ("gemma2", "gemma3_text", "olmo2", "olmo3"):  # y = x + RMSNorm(attn): gamma = 1 + w (Gemma) or w
                norm = layer.post_attention_layernorm
                entry.post_norm = norm
                entry.post_gain = norm.weight.detach().double() + (1.0 if t.startswith("gemma") else 0.0)
                entry.post_eps = norm.eps if hasattr(norm, "eps") else norm.variance_epsilon
            out.append(entry)
    elif t == "opt":
        H = cfg.num_attention_heads
        dh = cfg.hidden_size // H
        for layer in model.model.decoder.layers:
            a = layer.self_attn
            out.append(_Layer(layer, a, layer.self_attn_layer_norm, *lin_v(a.v_proj.weight, a.v_proj.bias, H, dh),
                              *lin_o(a.out_proj, H, dh), False, layer.fc2))
    elif t == "gpt2":
        H, d = cfg.n_head, cfg.n_embd
        dh = d // H
        for layer in model.transformer.h:
            w = layer.attn.c_attn.weight.detach().double()  # Conv1D [d, 3d]
            b = layer.attn.c_attn.bias.detach().double()
            Wv = w[:, 2 * d:].reshape(d, H, dh).permute(1, 0, 2)
            bv = b[2 * d:].reshape(H, dh)
            Wo = layer.attn.c_proj.weight.detach().double().reshape(H, dh, d)
            bo = layer.attn.c_proj.bias.detach().double()
            out.append(_Layer(layer, layer.attn, layer.ln_1, Wv, bv, Wo, bo, False, layer.mlp))
    elif t == "gpt_neox":
        H, d = cfg.num_attention_heads, cfg.hidden_size
        dh = d // H
        for layer in model.gpt_neox.layers:
            q = layer.attention.query_key_value
            w = q.weight.detach().double().view(H, 3, dh, d)[:, 2]  # [H, dh, d]
            Wv = w.transpose(1, 2)
            bv = None if q.bias is None else q.bias.detach().double().view(H, 3, dh)[:, 2]
            out.append(_Layer(layer, layer.attention, layer.input_layernorm, Wv, bv,
                              *lin_o(layer.attention.dense, H, dh), bool(cfg.use_parallel_residual), layer.mlp))
    elif t == "gptj":  # x + attn(ln_1(x)) + mlp(ln_1(x))
        H, d = cfg.n_head, cfg.n_embd
        dh = d // H
        for layer in model.transformer.h:
            a = layer.attn
            out.append(_Layer(layer, a, layer.ln_1, *lin_v(a.v_proj.weight, None, H, dh), *lin_o(a.out_proj, H, dh),
                              True, layer.mlp))
    elif t == "phi":  # x + attn(ln(x)) + mlp(ln(x))
        H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        dh = cfg.hidden_size // H
        for layer in model.model.layers:
            a = layer.self_attn
            out.append(_Layer(layer, a, layer.input_layernorm, *lin_v(a.v_proj.weight, a.v_proj.bias, Hkv, dh),
                              *lin_o(a.dense, H, dh), True, layer.mlp))
    else:
        raise KeyError(t)
    return out


def _prox(parts: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """parts [..., d] against y broadcast [..., d] -> [...]"""
    return (y.abs().sum(-1) - (y - parts).abs().sum(-1)).clamp_min(0)


def _normalise(prox_list):
    total = sum(p.sum() for p in prox_list)
    if total <= 0:
        return [torch.zeros_like(p) for p in prox_list]
    return [p / total for p in prox_list]


def _first(o):
    return (o[0] if isinstance(o, (tuple, list)) else o).detach()


@torch.no_grad()
def reference_importances(model, input_ids: torch.Tensor) -> dict:
    """float64 numpy arrays attn [L,H,T,T], attn_residual [L,T], ffn [L,T], ffn_residual [L,T] | None,
    and ``decomposition_error``: the largest of max |sum of attention parts + bias - what the attention
    (after its post-norm, if any) really added to the residual| and max |x + attention parts + bias + the
    FFN's real output - the block's real output|."""
    fam = _family(model)
    seen: dict[str, dict] = {k: {} for k in ("layer_in", "layer_out", "attn_in", "attn_model", "post", "ffn")}

    def keep(kind, i, value, first=False):
        if not (first and i in seen[kind]):
            seen[kind][i] = value

    hooks = []
    for i, e in enumerate(fam):
        hooks.append(e.attention.register_forward_hook(lambda m, a, o, i=i: keep("attn_model", i, _first(o))))
        hooks.append(e.layer.register_forward_pre_hook(
            lambda m, a, k, i=i: keep("layer_in", i, (a[0] if a else k["hidden_states"]).detach()), with_kwargs=True))
        hooks.append(e.layer.register_forward_hook(lambda m, a, o, i=i: keep("layer_out", i, _first(o))))
        hooks.append(e.ffn.register_forward_hook(lambda m, a, o, i=i: keep("ffn", i, _first(o))))
        if e.value_input is not None:
            hooks.append(e.value_input.register_forward_hook(lambda m, a, o, i=i: keep("attn_in", i, _first(o), True)))
        if e.post_norm is not None:
            hooks.append(e.post_norm.register_forward_hook(lambda m, a, o, i=i: keep("post", i, _first(o))))
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        res = model(input_ids=input_ids, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(prev)
        for h in hooks:
            h.remove()
    L = len(fam)
    T = input_ids.shape[1]
    H = res.attentions[0].shape[1]
    attn = np.zeros((L, H, T, T))
    attn_res = np.zeros((L, T))
    ffn = np.zeros((L, T))
    ffn_res = np.zeros((L, T))
    parallel = fam[0].parallel
    decomposition_error = 0.0
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for l, e in enumerate(fam):
        x = seen["layer_in"][l][0].double()  # [T, d]
        out = seen["layer_out"][l][0].double()
        normed = x if e.value_input is None else seen["attn_in"][l][0].double()  # [T, d]
        v = torch.einsum("td,kde->kte", normed, e.Wv)  # [Hkv, T, dh]
        if e.bv is not None:
            v = v + e.bv[:, None, :]
        if e.clip_v is not None:
            v = v.clamp(-e.clip_v, e.clip_v)
        v = v.repeat_interleave(H // v.shape[0], dim=0)  # [H, T, dh]
        F = torch.einsum("hte,hed->htd", v, e.Wo)  # [H, T, d]
        A = res.attentions[l][0].double()  # [H, T(pos), T(j)]
        bias = torch.zeros(T, x.shape[1], dtype=torch.float64) if e.bo is None else e.bo.expand(T, -1)  # [T, d]
        attn_real = seen["attn_model"][l][0].double()  # [T, d]  W_O output, bias included
        if e.post_norm is not None:
            # RMSNorm(a) = gamma * a / r with r the forward's own RMS of a: linear once r is fixed
            r = (attn_real.pow(2).mean(-1) + e.post_eps).sqrt()  # [T]
            F_rows = F[:, None, :, :] * (e.post_gain / r[:, None])[None, :, None, :]  # [H, pos, j, d]
            bias = bias * e.post_gain / r[:, None]
            attn_real = seen["post"][l][0].double()
        else:
            F_rows = F[:, None, :, :]
        Z = A[:, :, :, None] * F_rows  # [H, pos, j, d]  the materialised sub-edges
        attn_total = (Z * causal[None, :, :, None]).sum(dim=(0, 2)) + bias  # [T, d]
        if e.parallel:
            ffn_vec = out - x - attn_total
            y = out
        else:
            y = x + attn_total  # x^{lA}
            ffn_vec = out - y
        # the parts (sub-edges + output bias) must add up to what the attention really added to the residual,
        # and with the FFN's real output to the block's real output: a wrong slice of W_V / W_O, a missed
        # value bias or a wrong norm gain fails here, not silently
        ffn_real = seen["ffn"][l].reshape(seen["layer_out"][l].shape)[0].double()  # OPT's fc2 sees [B * T, d]
        decomposition_error = max(decomposition_error, float((attn_total - attn_real).abs().max()),
                                  float((x + attn_total + ffn_real - out).abs().max()))
        for pos in range(T):
            sub = _prox(Z[:, pos, : pos + 1, :], y[pos])  # [H, pos+1]
            res_p = _prox(x[pos], y[pos])
            if e.parallel:
                f_p = _prox(ffn_vec[pos], y[pos])
                sub_n, res_n, f_n = _normalise([sub, res_p, f_p])
                ffn[l, pos] = f_n
            else:
                sub_n, res_n = _normalise([sub, res_p])
                f_p = _prox(ffn_vec[pos], out[pos])
                r_p = _prox(y[pos], out[pos])
                f_n, r_n = _normalise([f_p, r_p])
                ffn[l, pos], ffn_res[l, pos] = f_n, r_n
            attn[l, :, pos, : pos + 1] = sub_n.numpy()
            attn_res[l, pos] = res_n
    return {
        "attn": attn,
        "attn_residual": attn_res,
        "ffn": ffn,
        "ffn_residual": None if parallel else ffn_res,
        "decomposition_error": decomposition_error,
    }


@torch.no_grad()
def materialising_importances(model, input_ids: torch.Tensor, dtype=torch.float32) -> dict:
    """The official implementation's algorithm, vectorised: per layer, materialise every sub-edge vector
    as a ``[T, T, H, d]`` tensor and take l1 distances. Memory ~ T^2 * H * d; timed by bench/.

    Uses flowray's capture (the activations are not what is being compared) and no chunking.
    """
    from flowray.capture import capture_all
    from flowray.models import adapter_for

    adapter = adapter_for(model)
    records = capture_all(model, adapter, input_ids)
    L, T = len(records), input_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    out = {"attn": [], "attn_residual": [], "ffn": [], "ffn_residual": []}
    for rec, layer in zip(records, adapter.layers()):
        w_o, _ = adapter.output_projection(layer)
        H = w_o.shape[0]
        x, attn_out, y_out = rec.inputs[0].to(dtype), rec.attn_out[0].to(dtype), rec.outputs[0].to(dtype)
        v = rec.values[0].to(dtype).repeat_interleave(H // rec.values.shape[1], 0)  # [H, T, dh]
        F = torch.bmm(v, w_o.to(dtype))  # [H, T, d]
        A = rec.probs[0].to(dtype) * causal  # [H, pos, j]
        if rec.row_scale is not None:  # post-attention norm: alpha's rows times 1 / r_pos
            A = A * rec.row_scale[0].to(dtype)[None, :, None]
        Z = torch.einsum("hpj,hjd->pjhd", A, F)  # [T, T, H, d]  every sub-edge, materialised
        y = x + attn_out
        ny = y.abs().sum(-1)  # [T]
        sub = (ny[:, None, None] - (y[:, None, None, :] - Z).abs().sum(-1)).clamp_min(0)  # [pos, j, H]
        sub = sub * causal[:, :, None]
        res = (ny - (y - x).abs().sum(-1)).clamp_min(0)
        total = sub.sum((1, 2)) + res
        scale = torch.where(total > 0, 1 / total.clamp_min(1e-30), torch.zeros_like(total))
        out["attn"].append((sub * scale[:, None, None]).permute(2, 0, 1))
        out["attn_residual"].append(res * scale)
        f = y_out - y
        pf = (y_out.abs().sum(-1) - (y_out - f).abs().sum(-1)).clamp_min(0)
        pr = (y_out.abs().sum(-1) - (y_out - y).abs().sum(-1)).clamp_min(0)
        t2 = pf + pr
        s2 = torch.where(t2 > 0, 1 / t2.clamp_min(1e-30), torch.zeros_like(t2))
        out["ffn"].append(pf * s2)
        out["ffn_residual"].append(pr * s2)
        del Z, sub
    return {k: torch.stack(v).numpy() for k, v in out.items()}
