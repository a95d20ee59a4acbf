"""Attention knockout: the "zero-pattern" intervention of the connectome write-up.

Set the post-softmax weight from query position ``i`` to source position ``j`` to zero in every head of
every layer, without renormalising the other weights. The model runs its own eager attention through a
function registered with transformers (``flowray.models.attention``), which zeroes the chosen weights and
applies them to the values again. Shapes: ``B`` batch rows, ``P`` prompts, ``T`` tokens, ``H`` query heads,
``dh`` head dim.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from flowray.baselines.forward import batches, check_batch_size, check_ids, check_targets, last_logits, logit_diff, progress_bar
from flowray.errors import FlowrayError, InputError
from flowray.models.attention import attention_implementation
from flowray.models.base import Adapter

KNOCKOUT_IMPLEMENTATION = "flowray_knockout"  # the name registered with transformers' AttentionInterface


class _KnockoutPlan:
    """What the registered attention function does for one attention module."""

    __slots__ = ("active", "eager", "pairs")

    def __init__(self, eager, active: bool):
        self.eager = eager
        self.active = active
        self.pairs = torch.zeros(0, 3, dtype=torch.long)


_PLANS: dict[int, _KnockoutPlan] = {}  # id(attention module) -> plan, only inside attention_knockout()


def _knockout_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's own eager attention, then the knocked-out weights applied to the values again.

    ``eager`` returns ``(out [B, T, H, dh], w [B, H, T, T])`` where ``out = (w @ repeat_kv(value))^T`` and
    ``w`` is exactly the (post-softmax, post-dropout, dtype-cast) matrix it multiplied. Zeroing entries of
    ``w`` and repeating that same product is the zero-pattern intervention itself, not an approximation of it.
    """
    plan = _PLANS.get(id(module))
    if plan is None:
        raise FlowrayError(
            f"the {KNOCKOUT_IMPLEMENTATION!r} attention implementation was used outside "
            "flowray.baselines.attention_knockout(); set the model's attention implementation back to 'eager'"
        )
    out, weights = plan.eager(module, query, key, value, attention_mask, **kwargs)
    if not plan.active or plan.pairs.shape[0] == 0:
        return out, weights
    B, H, Tq, Tk = weights.shape
    if Tq != Tk:
        raise InputError(f"attention knockout needs a forward pass without a cache (got {Tq} queries, {Tk} keys)")
    rows, q, src = plan.pairs.to(weights.device).unbind(1)
    if int(rows.max()) >= B or int(q.max()) >= Tq:
        raise InputError(
            f"knockout pair (row {int(rows.max())}, query {int(q.max())}) is outside the batch of {B} rows "
            f"x {Tq} tokens"
        )
    weights = weights.clone()
    weights[rows, :, q, src] = 0.0  # [K, H] entries: every head of this layer, no renormalisation
    values = value
    if values.shape[1] != H:  # grouped-query attention: head h reads kv head h // (H / H_kv), as repeat_kv
        values = values.repeat_interleave(H // values.shape[1], dim=1)
    out = torch.matmul(weights.to(values.dtype), values).transpose(1, 2).contiguous()  # [B, T, H, dh]
    return out, weights


class Knockout:
    """Handle yielded by ``attention_knockout``: ``set(pairs)`` changes what the next forward pass knocks out."""

    def __init__(self, plans: list[_KnockoutPlan]):
        self._plans = plans

    def set(self, pairs) -> None:
        """``pairs``: ``[K, 3]`` integer (batch row, query position i, source position j), ``j <= i``."""
        pairs = torch.as_tensor(np.asarray(pairs) if not isinstance(pairs, torch.Tensor) else pairs).long()
        if pairs.numel() == 0:
            pairs = pairs.reshape(0, 3)
        if pairs.dim() != 2 or pairs.shape[1] != 3:
            raise InputError(f"pairs must have shape [K, 3] (row, query i, source j); got {tuple(pairs.shape)}")
        if pairs.shape[0] and (int(pairs.min()) < 0 or bool((pairs[:, 2] > pairs[:, 1]).any())):
            raise InputError("knockout pairs need 0 <= source j <= query i (causal attention); got " + repr(pairs.tolist()[:5]))
        for plan in self._plans:
            plan.pairs = pairs


@contextlib.contextmanager
def attention_knockout(model, adapter: Adapter, pairs=None, *, layers=None) -> Iterator[Knockout]:
    """Within the block, zero the post-softmax attention weight of chosen (query i, source j) pairs.

    Every head of every layer in ``layers`` (default: all) is affected; nothing is renormalised. The model runs
    its own eager attention through a function registered with ``transformers.AttentionInterface``; the
    previous attention implementation is restored on exit. With no pairs the forward pass is the plain eager
    one, bit for bit.

    Args:
        pairs: ``[K, 3]`` (batch row, query i, source j); may be changed later with ``handle.set(pairs)``.
        layers: layer indices to intervene in (None: all).
    """
    n_layers = adapter.shape.n_layers
    if layers is not None:
        layers = {int(l) for l in layers}
        bad = sorted(l for l in layers if not 0 <= l < n_layers)
        if bad:
            raise InputError(f"layers must lie in [0, {n_layers}); got {bad}")
    plans = []
    keys = []
    for l, layer in enumerate(adapter.layers()):
        plan = _KnockoutPlan(adapter.eager_attention_function(layer), layers is None or l in layers)
        key = id(adapter.attention(layer))
        if key in _PLANS:
            raise FlowrayError("attention_knockout() is already active on this model; nesting is not supported")
        plans.append(plan)
        keys.append(key)
    handle = Knockout(plans)
    handle.set(pairs if pairs is not None else torch.zeros(0, 3, dtype=torch.long))
    try:
        for key, plan in zip(keys, plans):
            _PLANS[key] = plan
        with attention_implementation(model, KNOCKOUT_IMPLEMENTATION, _knockout_attention, mask="eager",
                                      purpose="attention knockout"):
            yield handle
    finally:
        for key in keys:
            _PLANS.pop(key, None)


@dataclass(frozen=True)
class KnockoutResult:
    """Attention knockout of every token pair ``j < i`` of ``P`` prompts of ``T`` tokens."""

    ld_clean: np.ndarray  # [P]
    ld_knocked: np.ndarray  # [P, T, T]  (prompt, query i, source j); NaN where j >= i

    @property
    def delta(self) -> np.ndarray:
        """``[P, T, T]``: ld_clean - ld_knocked, the connection strength (positive: j -> i helps the answer)."""
        return self.ld_clean[:, None, None] - self.ld_knocked


def knockout_pairs(n_tokens: int) -> np.ndarray:
    """``[T(T-1)/2, 2]`` every (query i, source j) with ``j < i``, query-major."""
    i, j = np.tril_indices(n_tokens, k=-1)
    return np.stack([i, j], axis=1)


def knockout_sweep(
    model,
    adapter: Adapter,
    input_ids,
    answer_ids,
    wrong_ids,
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> KnockoutResult:
    """Knock out every token pair ``j < i`` on its own (all heads, all layers): ``P * T(T-1)/2`` passes.

    Args:
        input_ids: ``[P, T]`` prompts of one length.
        answer_ids, wrong_ids: ``[P]``.
    """
    input_ids = check_ids(input_ids)
    batch_size = check_batch_size(batch_size)
    P, T = input_ids.shape
    answer_ids = check_targets(answer_ids, P, "answer_ids")
    wrong_ids = check_targets(wrong_ids, P, "wrong_ids")
    pairs = torch.as_tensor(knockout_pairs(T)).long()  # [Q, 2]
    grid = torch.cat([torch.arange(P).repeat_interleave(pairs.shape[0])[:, None], pairs.repeat(P, 1)], dim=1)
    ld_knocked = torch.full((P, T, T), float("nan"))
    with attention_knockout(model, adapter) as knock:
        ld_clean = logit_diff(last_logits(model, input_ids), answer_ids, wrong_ids).cpu()
        with progress_bar(grid.shape[0], "knockout", progress) as bar:
            for sl in batches(grid.shape[0], batch_size):
                p, i, j = grid[sl].unbind(1)
                knock.set(torch.stack([torch.arange(p.numel()), i, j], dim=1))
                ld = logit_diff(last_logits(model, input_ids[p]), answer_ids[p], wrong_ids[p])
                ld_knocked[p, i, j] = ld.cpu()
                bar.update(p.numel())
    return KnockoutResult(ld_clean=ld_clean.numpy(), ld_knocked=ld_knocked.numpy())


