"""Attribution patching (EAP; Syed et al. 2023): per-head patching effects from two forwards and one backward.

Patching head ``(l, h)`` replaces its output ``a`` (W_O's input, every position: the activation that
``flowray.baselines.interventions.replace_heads`` replaces) by the corrupted twin's ``a'``. To first order
the logit difference then changes by

    LD(patched) - LD(clean) ~= sum_{t, k} (a'_{t,k} - a_{t,k}) * dLD/da_{t,k}   (gradient at the clean run)

so one clean forward pass with gradients, one corrupted forward pass and one backward pass score every head
of every layer at once. The estimate is exact where LD is affine in the patched activation (e.g. the last
layer's heads of a model whose final block feeds the logits linearly) and off by second-order terms
elsewhere (``tests/test_eap.py``). Shapes: ``P`` prompts, ``T`` tokens, ``L`` layers, ``H`` heads, ``dh``
head dim.
"""

from __future__ import annotations

import contextlib

import torch

from flowray.baselines.forward import check_twins, logit_diff, model_device
from flowray.baselines.interventions import PatchingResult, head_outputs, split_heads, w_o_inputs
from flowray.errors import InputError
from flowray.models.base import Adapter
from flowray.models.modes import eval_mode


@contextlib.contextmanager
def _head_inputs_with_grad(model, adapter: Adapter, sink: dict):
    """Within the block, a forward pass keeps every layer's W_O input ``[B, T, H*dh]`` (in the autograd graph)
    in ``sink[layer]``; the input embeddings become the graph's leaf, so no weight needs a gradient."""

    def leaf(_module, _args, out):
        return out.detach().requires_grad_(True)

    handle = model.get_input_embeddings().register_forward_hook(leaf)
    try:
        with w_o_inputs(adapter, sink.__setitem__):
            yield
    finally:
        handle.remove()


def eap_sweep(model, adapter: Adapter, clean_ids, corrupt_ids, answer_ids, wrong_ids) -> PatchingResult:
    """Every head's attribution-patching estimate of per-head activation patching from the corrupted twin.

    Args:
        clean_ids, corrupt_ids: ``[P, T]`` token ids; row ``p`` of each is a clean/corrupted twin.
        answer_ids, wrong_ids: ``[P]`` the token ids of the logit difference.

    Returns:
        a ``PatchingResult`` whose ``ld_patched [P, L, H]`` is the first-order estimate
        ``LD_clean + sum_{t,k} (a_corrupt - a_clean) * dLD/da`` (``ld_clean``, ``ld_corrupt`` exact), so that
        ``effect()`` compares with ``patching_sweep``'s directly.
    """
    clean_ids, corrupt_ids, answer_ids, wrong_ids = check_twins(clean_ids, corrupt_ids, answer_ids, wrong_ids)
    P = clean_ids.shape[0]
    s = adapter.shape
    corrupt_acts, corrupt_logits = head_outputs(model, adapter, corrupt_ids)  # [L, P, T, H, dh]; forward 1
    ld_corrupt = logit_diff(corrupt_logits, answer_ids, wrong_ids)
    acts: dict[int, torch.Tensor] = {}
    with eval_mode(model), torch.enable_grad(), _head_inputs_with_grad(model, adapter, acts):
        out = model(input_ids=clean_ids.to(model_device(model)), use_cache=False, logits_to_keep=1)  # forward 2
        logits = out.logits[:, -1]
        ld_clean = logit_diff(logits.to(torch.promote_types(logits.dtype, torch.float32)), answer_ids, wrong_ids)
        if len(acts) != s.n_layers:
            raise InputError(f"the forward pass reached {len(acts)} of the model's {s.n_layers} W_O inputs")
        inputs = [acts[l] for l in range(s.n_layers)]
        # rows do not interact, so the gradient of the summed LD is each row's own gradient; backward
        grads = torch.autograd.grad(ld_clean.sum(), inputs)
    dtype = ld_clean.dtype  # float32, or float64 for a float64 model
    score = torch.empty(P, s.n_layers, s.n_heads, dtype=dtype)
    with torch.no_grad():
        for l, (a, g) in enumerate(zip(inputs, grads)):
            delta = corrupt_acts[l].to(a.device, dtype) - split_heads(a, adapter).to(dtype)  # [P, T, H, dh]
            score[:, l] = (delta * split_heads(g, adapter).to(dtype)).sum(dim=(1, 3)).cpu()  # [P, H]
    ld_clean = ld_clean.detach().cpu()
    return PatchingResult(
        ld_clean=ld_clean.numpy(),
        ld_corrupt=ld_corrupt.cpu().to(dtype).numpy(),
        ld_patched=(ld_clean[:, None, None] + score).numpy(),
    )
