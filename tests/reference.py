"""The exact, naive reference: materialise every sub-edge vector (the official algorithm), in float64.

Written apart from flowray's capture and adapters on purpose: it reads each family's weights itself,
recomputes the value vectors from the attention norm's output, and checks that the parts it builds add up
to the node the model really computed (so a wrong slice of W_V or W_O cannot agree with flowray by
accident). Memory grows as T^2 * H * d: only for tiny models and short sequences (and bench/).
"""

from __future__ import annotations

import numpy as np
import torch


def _family(model):
    """Per layer: (layer, attention module, attn_norm, W_V [Hkv, d, dh], b_V [Hkv, dh] | None,
    W_O [H, dh, d], b_O [d] | None, parallel)."""
    cfg = model.config
    t = cfg.model_type

    def lin_v(lin, n_kv, dh):
        w = lin.weight.detach().double()  # [n_kv*dh, d]
        W = w.view(n_kv, dh, -1).transpose(1, 2)  # [n_kv, d, dh]
        b = None if lin.bias is None else lin.bias.detach().double().view(n_kv, dh)
        return W, b

    def lin_o(lin, n_h, dh):
        w = lin.weight.detach().double()  # [d, n_h*dh]
        return w.T.reshape(n_h, dh, -1), None if lin.bias is None else lin.bias.detach().double()

    out = []
    if t in ("llama", "mistral", "qwen2"):
        H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
        for layer in model.model.layers:
            a = layer.self_attn
            out.append((layer, a, layer.input_layernorm, *lin_v(a.v_proj, Hkv, dh), *lin_o(a.o_proj, H, dh), False))
    elif t == "opt":
        H = cfg.num_attention_heads
        dh = cfg.hidden_size // H
        for layer in model.model.decoder.layers:
            a = layer.self_attn
            out.append((layer, a, layer.self_attn_layer_norm, *lin_v(a.v_proj, H, dh), *lin_o(a.out_proj, H, dh), False))
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
            out.append((layer, layer.attn, layer.ln_1, Wv, bv, Wo, bo, False))
    elif t == "gpt_neox":
        H, d = cfg.num_attention_heads, cfg.hidden_size
        dh = d // H
        for layer in model.gpt_neox.layers:
            q = layer.attention.query_key_value
            w = q.weight.detach().double().view(H, 3, dh, d)[:, 2]  # [H, dh, d]
            Wv = w.transpose(1, 2)
            bv = None if q.bias is None else q.bias.detach().double().view(H, 3, dh)[:, 2]
            out.append((layer, layer.attention, layer.input_layernorm, Wv, bv, *lin_o(layer.attention.dense, H, dh),
                        bool(cfg.use_parallel_residual)))
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


@torch.no_grad()
def reference_importances(model, input_ids: torch.Tensor) -> dict:
    """float64 numpy arrays attn [L,H,T,T], attn_residual [L,T], ffn [L,T], ffn_residual [L,T] | None,
    and ``decomposition_error``: max |sum of attention parts + b_O - the attention module's output|."""
    fam = _family(model)
    layer_in, layer_out, attn_in, attn_model = {}, {}, {}, {}
    hooks = []
    for i, (layer, attention, norm, *_rest) in enumerate(fam):
        hooks.append(attention.register_forward_hook(
            lambda m, a, o, i=i: attn_model.__setitem__(i, o[0].detach())))
        hooks.append(layer.register_forward_pre_hook(
            lambda m, a, k, i=i: layer_in.__setitem__(i, (a[0] if a else k["hidden_states"]).detach()),
            with_kwargs=True))
        hooks.append(layer.register_forward_hook(
            lambda m, a, o, i=i: layer_out.__setitem__(i, (o[0] if isinstance(o, tuple) else o).detach())))
        hooks.append(norm.register_forward_hook(
            lambda m, a, o, i=i: attn_in.setdefault(i, o.detach())))
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
    parallel = fam[0][-1]
    decomposition_error = 0.0
    for l, (_layer, _attention, _norm, Wv, bv, Wo, bo, par) in enumerate(fam):
        x = layer_in[l][0].double()  # [T, d]
        out = layer_out[l][0].double()
        normed = attn_in[l][0].double()  # [T, d]
        v = torch.einsum("td,kde->kte", normed, Wv)  # [Hkv, T, dh]
        if bv is not None:
            v = v + bv[:, None, :]
        v = v.repeat_interleave(H // v.shape[0], dim=0)  # [H, T, dh]
        F = torch.einsum("hte,hed->htd", v, Wo)  # [H, T, d]
        A = res.attentions[l][0].double()  # [H, T(pos), T(j)]
        Z = A[:, :, :, None] * F[:, None, :, :]  # [H, pos, j, d]  the materialised sub-edges
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        attn_total = (Z * causal[None, :, :, None]).sum(dim=(0, 2))  # [T, d]
        if bo is not None:
            attn_total = attn_total + bo
        if par:
            ffn_vec = out - x - attn_total
            y = out
        else:
            y = x + attn_total  # x^{lA}
            ffn_vec = out - y
        # the parts (sub-edges + output bias) must add up to what the attention module really output:
        # a wrong slice of W_V / W_O or a missed value bias fails here, not silently
        decomposition_error = max(decomposition_error, float((attn_total - attn_model[l][0].double()).abs().max()))
        for pos in range(T):
            sub = _prox(Z[:, pos, : pos + 1, :], y[pos])  # [H, pos+1]
            res_p = _prox(x[pos], y[pos])
            if par:
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
