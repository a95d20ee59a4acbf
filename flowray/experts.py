"""Per-expert importances of MoE blocks (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE): the FFN part, split.

``edge_importances`` treats a MoE FFN as one part of the block node, as the paper does for any FFN. The
router's output is a sum, so the block node splits further, exactly:

    x^l_pos = x^{lA}_pos + sum_k w_{pos,k} E_{e(pos,k)}(x~_pos) + dense_pos

with ``e(pos, k)`` the ``k``-th expert the router chose at ``pos``, ``w`` its routing weight and ``dense`` the
non-routed rest of the FFN (Qwen2-MoE's gated shared expert, the whole FFN of a dense layer; zero up to
rounding elsewhere). Each part's importance is its ALTI proximity to ``x^l_pos`` over the sum of all parts'
proximities. Every expert output is computed by the model's own experts module, one routing slot at a
time, on the inputs and routing weights of the real forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flowray.errors import InputError, UnsupportedArchitectureError
from flowray.importance import direct_node


@dataclass
class ExpertImportances:
    """One sequence. ``L`` layers, ``T`` tokens, ``E`` routed experts per layer; float32 numpy."""

    experts: np.ndarray  # [L, T, E]  importance of expert e's weighted output in x^l_pos; 0 where not chosen
    dense: np.ndarray  # [L, T]  the FFN's non-routed part (shared expert / dense layer)
    residual: np.ndarray  # [L, T]  x^{lA}_pos, the residual part of the block node
    chosen: np.ndarray  # [L, T, k] int64  the router's chosen experts (-1 in dense layers)


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def expert_importances(model, input_ids, *, backend: str = "auto") -> ExpertImportances:
    """Per-expert importances of every MoE block node for one ``[1, T]`` sequence (one forward pass).

    Args:
        model: a MoE causal LM of a supported family (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE) or a LoadedModel.
        input_ids: ``[1, T]`` token ids.
        backend: the normalisation kernel, as for ``edge_importances``.
    """
    from flowray.api import check_input_ids
    from flowray.models.loading import model_parts

    hf_model, adapter, _, _ = model_parts(model)
    if adapter.n_experts == 0:
        raise UnsupportedArchitectureError(
            f"{adapter.family} ({hf_model.config.model_type!r}) has no routed experts; expert_importances needs "
            "a MoE model (mixtral, olmoe, qwen2_moe, qwen3_moe)"
        )
    ids = check_input_ids(input_ids, adapter, getattr(hf_model.config, "vocab_size", None))
    layers = adapter.layers()
    seen: list[dict] = [{} for _ in layers]
    handles = []

    def hooks(i: int):
        def on_layer(_m, _args, output):
            seen[i]["out"] = _first(output)

        def on_ffn(_m, _args, output):
            seen[i]["ffn"] = _first(output)

        def on_experts(module, args, _output):
            hidden, index, weights = args[:3]  # [N, d], [N, k], [N, k]
            # each routing slot's weighted expert output, from the module's own forward (hooks bypassed)
            seen[i]["slots"] = torch.stack(
                [module.forward(hidden, index[:, k : k + 1], weights[:, k : k + 1]) for k in range(index.shape[1])]
            )  # [k, N, d]
            seen[i]["index"] = index

        return on_layer, on_ffn, on_experts

    try:
        for i, layer in enumerate(layers):
            on_layer, on_ffn, on_experts = hooks(i)
            handles.append(layer.register_forward_hook(on_layer))
            handles.append(adapter.ffn_module(layer).register_forward_hook(on_ffn))
            experts = adapter.experts_module(layer)
            if experts is not None:
                handles.append(experts.register_forward_hook(on_experts))
        device = next(hf_model.parameters()).device
        hf_model(input_ids=ids.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return _importances(seen, adapter.n_experts, ids.shape[1], backend)


def _importances(seen: list[dict], n_experts: int, T: int, backend: str) -> ExpertImportances:
    L = len(seen)
    k_max = max((s["index"].shape[1] for s in seen if "index" in s), default=0)
    if k_max == 0:
        raise InputError("no layer of this model routed through its experts in the forward pass")
    experts = np.zeros((L, T, n_experts), dtype=np.float32)
    dense = np.zeros((L, T), dtype=np.float32)
    residual = np.zeros((L, T), dtype=np.float32)
    chosen = np.full((L, T, k_max), -1, dtype=np.int64)
    for l, s in enumerate(seen):
        out = s["out"][0].float()  # [T, d]
        ffn = s["ffn"].reshape(s["out"].shape)[0].float()  # [T, d]
        mid = out - ffn  # x^{lA}
        if "slots" in s:
            slots = s["slots"].reshape(-1, *s["out"].shape)[:, 0].float()  # [k, T, d]
            index = s["index"].reshape(*s["out"].shape[:2], -1)[0].cpu()  # [T, k]
        else:  # a dense layer among MoE ones (Qwen2-MoE's mlp_only_layers)
            slots = ffn.new_zeros(0, T, ffn.shape[1])
            index = torch.zeros(T, 0, dtype=torch.long)
        rest = ffn - slots.sum(0)  # [T, d]  the non-routed part
        parts = torch.cat([mid[None], slots, rest[None]])  # [1 + k + 1, T, d]
        direct = direct_node(out.contiguous(), parts.contiguous(), backend=backend).direct.cpu().numpy()  # [K, T]
        residual[l], dense[l] = direct[0], direct[-1]
        k = index.shape[1]
        chosen[l, :, :k] = index.numpy()
        for slot in range(k):
            experts[l, np.arange(T), index[:, slot].numpy()] = direct[1 + slot]
    return ExpertImportances(experts=experts, dense=dense, residual=residual, chosen=chosen)
