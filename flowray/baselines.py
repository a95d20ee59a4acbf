"""Patching baselines on flowray's adapters: per-head activation patching, attention knockout, head ablation.

These are the interventions information flow routes are compared with (``flowray.compare``):

- **activation patching** (Wang et al. 2023; paper appendix A): run the clean prompt, but replace one head's
  output (its slice of W_O's input, at every position) with the head's output on the corrupted twin;
- **attention knockout** (the "zero-pattern" intervention of the connectome write-up): set the post-softmax
  weight from query position ``i`` to source position ``j`` to zero in every head of every layer, without
  renormalising the other weights;
- **head ablation**: replace chosen heads' outputs with their mean over a reference batch (per position)
  or with zeros.

Everything is tensors in, tensors out. Hooks and the attention implementation switch live in context
managers that always undo themselves. Shapes: ``B`` batch rows, ``P`` prompts, ``T`` tokens, ``L`` layers,
``H`` query heads, ``dh`` head dim, ``V`` vocabulary. Prompts of one call share one length (no padding);
group prompts by length before calling (``flowray.compare`` does).

The metric everywhere is the logit difference at the last position,
``LD = logit(answer) - logit(wrong)`` (IOI: indirect object minus subject).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from flowray.capture import register_attention
from flowray.errors import FlowrayError, InputError, UnsupportedArchitectureError
from flowray.models.base import Adapter

KNOCKOUT_IMPLEMENTATION = "flowray_knockout"  # the name registered with transformers' AttentionInterface
ABLATION_MODES = ("mean", "zero")


# --- shared helpers ----------------------------------------------------------------------------------
def _check_ids(input_ids, what: str = "input_ids") -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(np.asarray(input_ids))
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise InputError(
            f"{what} must have shape [B, T] (prompts of one length); got shape {tuple(input_ids.shape)}"
        )
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"{what} must be integer token ids; got dtype {input_ids.dtype}")
    return input_ids.long()


def _check_targets(ids, n: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(ids)).long().reshape(-1)
    if t.numel() != n:
        raise InputError(f"{what} must hold one token id per prompt ({n}); got {t.numel()}")
    return t


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def last_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, V]`` float32 logits at the last position (only that position goes through the unembedding)."""
    out = model(input_ids=input_ids.to(_device(model)), use_cache=False, logits_to_keep=1)
    return out.logits[:, -1].float()


def logit_diff(logits: torch.Tensor, answer_ids: torch.Tensor, wrong_ids: torch.Tensor) -> torch.Tensor:
    """``[B]`` logit(answer) - logit(wrong) from ``[B, V]`` last-position logits."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, answer_ids.to(logits.device)] - logits[rows, wrong_ids.to(logits.device)]


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="fwd", disable=not enabled, leave=False)


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer (rows per forward pass); got {batch_size!r}")
    return batch_size


# --- head outputs: the input of W_O ------------------------------------------------------------------
def _split_heads(x: torch.Tensor, adapter: Adapter) -> torch.Tensor:
    B, T, C = x.shape
    s = adapter.shape
    if C != s.n_heads * s.head_dim:
        raise UnsupportedArchitectureError(
            f"{adapter.family}: W_O's input has {C} features, expected n_heads * head_dim = "
            f"{s.n_heads} * {s.head_dim}; the adapter's head_output_module is not W_O"
        )
    return x.reshape(B, T, s.n_heads, s.head_dim)  # [B, T, H, dh]


@contextlib.contextmanager
def replace_heads(
    model,
    adapter: Adapter,
    rows,
    layers,
    heads,
    source: torch.Tensor | None = None,
    source_rows=None,
) -> Iterator[None]:
    """Within the block, forward passes replace chosen heads' outputs (W_O's input, every position).

    Replacement ``k`` sets head ``heads[k]`` of layer ``layers[k]`` in batch row ``rows[k]`` to
    ``source[layers[k], source_rows[k], :, heads[k]]`` (``[T, dh]``), or to zeros when ``source`` is None.

    Args:
        rows, layers, heads, source_rows: ``[K]`` integer sequences.
        source: ``[L, S, T, H, dh]`` head outputs to copy from (``head_outputs``' layout), or None.
    """
    rows, layers, heads = (torch.as_tensor(np.asarray(v)).long().reshape(-1) for v in (rows, layers, heads))
    if not rows.numel() == layers.numel() == heads.numel():
        raise InputError(
            f"rows, layers and heads must have one entry per replacement; got {rows.numel()}, "
            f"{layers.numel()}, {heads.numel()}"
        )
    s = adapter.shape
    if rows.numel() and (int(layers.min()) < 0 or int(layers.max()) >= s.n_layers):
        raise InputError(f"layers must lie in [0, {s.n_layers}); got {sorted(set(layers.tolist()))}")
    if rows.numel() and (int(heads.min()) < 0 or int(heads.max()) >= s.n_heads):
        raise InputError(f"heads must lie in [0, {s.n_heads}); got {sorted(set(heads.tolist()))}")
    if source is not None:
        source_rows = torch.as_tensor(np.asarray(source_rows)).long().reshape(-1)
        if source_rows.numel() != rows.numel():
            raise InputError(f"source_rows must have one entry per replacement ({rows.numel()}); got {source_rows.numel()}")
        if source.dim() != 5 or source.shape[0] != s.n_layers or source.shape[3:] != (s.n_heads, s.head_dim):
            raise InputError(
                f"source must have shape [L={s.n_layers}, S, T, H={s.n_heads}, dh={s.head_dim}]; "
                f"got {tuple(source.shape)}"
            )
    handles = []

    def make_hook(l: int, r: torch.Tensor, h: torch.Tensor, sr: torch.Tensor | None):
        def pre(_module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            x4 = _split_heads(x, adapter).clone()  # [B, T, H, dh]; never edit the caller's tensor in place
            if int(r.max()) >= x4.shape[0]:
                raise InputError(f"replacement row {int(r.max())} is outside the batch of {x4.shape[0]} rows")
            if sr is None:
                x4[r, :, h] = 0.0
            else:
                src = source[l]  # [S, T, H, dh]
                if src.shape[1] != x4.shape[1]:
                    raise InputError(f"source has {src.shape[1]} positions but the input has {x4.shape[1]}")
                x4[r, :, h] = src[sr, :, h].to(device=x4.device, dtype=x4.dtype)  # [K_l, T, dh]
            new = x4.reshape(x.shape)
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "input": new})

        return pre

    try:
        for l, layer in enumerate(adapter.layers()):
            sel = layers == l
            if not bool(sel.any()):
                continue
            sr = None if source is None else source_rows[sel]
            module = adapter.head_output_module(layer)
            handles.append(module.register_forward_pre_hook(make_hook(l, rows[sel], heads[sel], sr), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def head_outputs(model, adapter: Adapter, input_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Every head's output (W_O's input) in one forward pass.

    Returns ``(acts [L, B, T, H, dh], logits [B, V])`` (logits at the last position).
    """
    input_ids = _check_ids(input_ids)
    acts: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(l: int):
        def pre(_module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            acts[l] = _split_heads(x, adapter).detach().clone()

        return pre

    try:
        for l, layer in enumerate(adapter.layers()):
            handles.append(adapter.head_output_module(layer).register_forward_pre_hook(make_hook(l), with_kwargs=True))
        logits = last_logits(model, input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([acts[l] for l in range(len(acts))]), logits


def head_means(model, adapter: Adapter, reference_ids) -> torch.Tensor:
    """``[L, T, H, dh]``: each head's output at each position, averaged over a reference batch ``[N, T]``."""
    acts, _ = head_outputs(model, adapter, reference_ids)
    return acts.mean(dim=1)


# --- activation patching -----------------------------------------------------------------------------
@dataclass(frozen=True)
class PatchingResult:
    """Per-head activation patching of ``P`` clean prompts with their corrupted twins."""

    ld_clean: np.ndarray  # [P]  logit difference on the clean prompt
    ld_corrupt: np.ndarray  # [P]  logit difference on the corrupted prompt
    ld_patched: np.ndarray  # [P, L, H]  clean run with head (l, h) patched from the corrupted run

    @property
    def drop(self) -> np.ndarray:
        """``[P, L, H]``: ld_clean - ld_patched (positive: the head carries what the corruption removes)."""
        return self.ld_clean[:, None, None] - self.ld_patched

    def effect(self) -> np.ndarray:
        """``[L, H]``: the drop normalised by the full corruption, on means over prompts.

        ``mean_p(ld_clean - ld_patched) / mean_p(ld_clean - ld_corrupt)``: 1 means patching the head alone
        does what corrupting the whole prompt does; per-prompt ratios are avoided because a prompt whose
        corruption barely moves the logit difference would dominate them.
        """
        denom = float(np.mean(self.ld_clean - self.ld_corrupt))
        if abs(denom) < 1e-12:
            raise FlowrayError("the corruption does not change the mean logit difference; the effect is undefined")
        return self.drop.mean(axis=0) / denom

    @staticmethod
    def concatenate(results: list[PatchingResult]) -> PatchingResult:
        return PatchingResult(
            ld_clean=np.concatenate([r.ld_clean for r in results]),
            ld_corrupt=np.concatenate([r.ld_corrupt for r in results]),
            ld_patched=np.concatenate([r.ld_patched for r in results]),
        )


def patching_sweep(
    model,
    adapter: Adapter,
    clean_ids,
    corrupt_ids,
    answer_ids,
    wrong_ids,
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> PatchingResult:
    """Patch every head of every layer, one at a time, from the corrupted twin into the clean run.

    ``P * L * H`` patched forward passes, ``batch_size`` of them per batch (rows are (prompt, head) pairs).

    Args:
        clean_ids, corrupt_ids: ``[P, T]`` token ids; row ``p`` of each is a clean/corrupted twin.
        answer_ids, wrong_ids: ``[P]`` the token ids of the logit difference.
    """
    clean_ids = _check_ids(clean_ids, "clean_ids")
    corrupt_ids = _check_ids(corrupt_ids, "corrupt_ids")
    if clean_ids.shape != corrupt_ids.shape:
        raise InputError(
            f"clean_ids and corrupt_ids must have the same shape [P, T] (twins of equal token length); "
            f"got {tuple(clean_ids.shape)} and {tuple(corrupt_ids.shape)}"
        )
    batch_size = _check_batch_size(batch_size)
    P = clean_ids.shape[0]
    answer_ids = _check_targets(answer_ids, P, "answer_ids")
    wrong_ids = _check_targets(wrong_ids, P, "wrong_ids")
    s = adapter.shape
    corrupt_acts, corrupt_logits = head_outputs(model, adapter, corrupt_ids)  # [L, P, T, H, dh]
    ld_corrupt = logit_diff(corrupt_logits, answer_ids, wrong_ids)
    ld_clean = logit_diff(last_logits(model, clean_ids), answer_ids, wrong_ids)
    # every (prompt, layer, head), prompt-major
    grid = torch.cartesian_prod(torch.arange(P), torch.arange(s.n_layers), torch.arange(s.n_heads))  # [K, 3]
    ld_patched = torch.empty(P, s.n_layers, s.n_heads)
    with _progress(grid.shape[0], "patching", progress) as bar:
        for sl in _batches(grid.shape[0], batch_size):
            p, l, h = grid[sl].unbind(1)
            rows = torch.arange(p.numel())
            with replace_heads(model, adapter, rows, l, h, source=corrupt_acts, source_rows=p):
                ld = logit_diff(last_logits(model, clean_ids[p]), answer_ids[p], wrong_ids[p])
            ld_patched[p, l, h] = ld.cpu()
            bar.update(p.numel())
    return PatchingResult(
        ld_clean=ld_clean.cpu().numpy(), ld_corrupt=ld_corrupt.cpu().numpy(), ld_patched=ld_patched.numpy()
    )


# --- attention knockout ------------------------------------------------------------------------------
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
    register_attention(KNOCKOUT_IMPLEMENTATION, _knockout_attention, "eager")
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
    previous = getattr(model.config, "_attn_implementation", None)
    try:
        for key, plan in zip(keys, plans):
            _PLANS[key] = plan
        model.set_attn_implementation(KNOCKOUT_IMPLEMENTATION)
        if model.config._attn_implementation != KNOCKOUT_IMPLEMENTATION:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} does not let transformers switch its attention implementation, so "
                "attention knockout cannot intervene on it"
            )
        yield handle
    finally:
        if previous is not None and model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)
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
    input_ids = _check_ids(input_ids)
    batch_size = _check_batch_size(batch_size)
    P, T = input_ids.shape
    answer_ids = _check_targets(answer_ids, P, "answer_ids")
    wrong_ids = _check_targets(wrong_ids, P, "wrong_ids")
    pairs = torch.as_tensor(knockout_pairs(T)).long()  # [Q, 2]
    grid = torch.cat([torch.arange(P).repeat_interleave(pairs.shape[0])[:, None], pairs.repeat(P, 1)], dim=1)
    ld_knocked = torch.full((P, T, T), float("nan"))
    with attention_knockout(model, adapter) as knock:
        ld_clean = logit_diff(last_logits(model, input_ids), answer_ids, wrong_ids).cpu()
        with _progress(grid.shape[0], "knockout", progress) as bar:
            for sl in _batches(grid.shape[0], batch_size):
                p, i, j = grid[sl].unbind(1)
                knock.set(torch.stack([torch.arange(p.numel()), i, j], dim=1))
                ld = logit_diff(last_logits(model, input_ids[p]), answer_ids[p], wrong_ids[p])
                ld_knocked[p, i, j] = ld.cpu()
                bar.update(p.numel())
    return KnockoutResult(ld_clean=ld_clean.numpy(), ld_knocked=ld_knocked.numpy())


# --- head ablation -----------------------------------------------------------------------------------
def _head_masks(heads, B: int, adapter: Adapter) -> torch.Tensor:
    """Accept ``[L, H]`` / ``[B, L, H]`` bool masks or an iterable of (layer, head); return ``[B, L, H]``."""
    s = adapter.shape
    if isinstance(heads, (np.ndarray, torch.Tensor)):
        mask = torch.as_tensor(np.asarray(heads) if isinstance(heads, np.ndarray) else heads).bool()
    else:
        mask = torch.zeros(s.n_layers, s.n_heads, dtype=torch.bool)
        for item in heads:
            l, h = (int(v) for v in item)
            if not (0 <= l < s.n_layers and 0 <= h < s.n_heads):
                raise InputError(f"head {item!r} is outside the model's {s.n_layers} layers x {s.n_heads} heads")
            mask[l, h] = True
    if mask.shape == (s.n_layers, s.n_heads):
        mask = mask[None].expand(B, -1, -1)
    if mask.shape != (B, s.n_layers, s.n_heads):
        raise InputError(
            f"head mask must have shape [L, H] = [{s.n_layers}, {s.n_heads}] or [B, L, H] with B = {B}; "
            f"got {tuple(mask.shape)}"
        )
    return mask


@torch.inference_mode()
def ablate_heads(model, adapter: Adapter, input_ids, heads, *, mode: str = "mean", means=None) -> torch.Tensor:
    """``[B, V]`` last-position logits with chosen heads' outputs replaced (every position).

    Args:
        input_ids: ``[B, T]``.
        heads: ``[L, H]`` or ``[B, L, H]`` bool mask (per row), or an iterable of ``(layer, head)``.
        mode: ``"mean"`` (replace with ``means``) or ``"zero"``.
        means: ``[L, T, H, dh]`` (one reference for every row, ``head_means``) or ``[L, B, T, H, dh]`` (per row);
            mode "mean" only.
    """
    input_ids = _check_ids(input_ids)
    if mode not in ABLATION_MODES:
        raise InputError(f"mode must be one of {ABLATION_MODES}; got {mode!r}")
    B = input_ids.shape[0]
    mask = _head_masks(heads, B, adapter)
    rows, layers, hs = mask.nonzero(as_tuple=True)
    source = source_rows = None
    if mode == "mean":
        if means is None:
            raise InputError("mode='mean' needs means (flowray.baselines.head_means of a reference batch)")
        if means.dim() == 4:  # shared by all rows
            source, source_rows = means[:, None], torch.zeros_like(rows)
        elif means.dim() == 5 and means.shape[1] == B:
            source, source_rows = means, rows
        else:
            raise InputError(f"means must have shape [L, T, H, dh] or [L, B={B}, T, H, dh]; got {tuple(means.shape)}")
    elif means is not None:
        raise InputError("means is only used with mode='mean'; got means with mode='zero'")
    with replace_heads(model, adapter, rows, layers, hs, source=source, source_rows=source_rows):
        return last_logits(model, input_ids)


def ablation_sweep(
    model,
    adapter: Adapter,
    input_ids,
    masks,
    answer_ids,
    wrong_ids,
    *,
    mode: str = "mean",
    means=None,
    batch_size: int = 64,
) -> np.ndarray:
    """``[C, P]`` logit differences of ``P`` prompts under each of ``C`` head masks (rows batched together).

    Args:
        input_ids: ``[P, T]``; masks: ``[C, L, H]`` bool; answer_ids, wrong_ids: ``[P]``.
        means: ``[L, T, H, dh]`` or per prompt ``[L, P, T, H, dh]`` (mode "mean").
    """
    input_ids = _check_ids(input_ids)
    batch_size = _check_batch_size(batch_size)
    P = input_ids.shape[0]
    answer_ids = _check_targets(answer_ids, P, "answer_ids")
    wrong_ids = _check_targets(wrong_ids, P, "wrong_ids")
    masks = torch.as_tensor(np.asarray(masks)).bool()
    s = adapter.shape
    if masks.dim() != 3 or masks.shape[1:] != (s.n_layers, s.n_heads):
        raise InputError(f"masks must have shape [C, L={s.n_layers}, H={s.n_heads}]; got {tuple(masks.shape)}")
    C = masks.shape[0]
    grid = torch.cartesian_prod(torch.arange(C), torch.arange(P)).reshape(-1, 2)  # [C*P, 2] (config, prompt)
    out = torch.empty(C, P)
    for sl in _batches(grid.shape[0], batch_size):
        c, p = grid[sl].unbind(1)
        row_means = None
        if mode == "mean":
            if means is None:
                raise InputError("mode='mean' needs means (flowray.baselines.head_means of a reference batch)")
            row_means = means if means.dim() == 4 else means[:, p]
        logits = ablate_heads(model, adapter, input_ids[p], masks[c], mode=mode, means=row_means)
        out[c, p] = logit_diff(logits, answer_ids[p], wrong_ids[p]).cpu()
    return out.numpy()
