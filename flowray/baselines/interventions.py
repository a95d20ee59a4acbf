"""Head interventions on flowray's adapters: per-head activation patching and head ablation.

- **activation patching** (Wang et al. 2023; paper appendix A): run the clean prompt, but replace one head's
  output (its slice of W_O's input, at every position) with the head's output on the corrupted twin;
- **head ablation**: replace chosen heads' outputs with their mean over a reference batch (per position)
  or with zeros.

(The third intervention, attention knockout, is ``flowray.baselines.knockout``.) Everything is tensors in,
tensors out; hooks live in context managers that always remove them. Shapes: ``B`` batch rows, ``P``
prompts, ``T`` tokens, ``L`` layers, ``H`` query heads, ``dh`` head dim, ``V`` vocabulary. Prompts of one
call share one length (no padding); group prompts by length before calling (``flowray.baselines.run``
does).

The metric everywhere is the logit difference at the last position,
``LD = logit(answer) - logit(wrong)`` (IOI: indirect object minus subject).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from flowray.baselines.forward import (batches, check_batch_size, check_ids, check_targets, check_twins, last_logits,
                                       logit_diff, progress_bar)
from flowray.baselines.options import ABLATION_MODES
from flowray.errors import FlowrayError, InputError, UnsupportedArchitectureError
from flowray.models.base import Adapter


# --- head outputs: the input of W_O ------------------------------------------------------------------
def split_heads(x: torch.Tensor, adapter: Adapter) -> torch.Tensor:
    """W_O's input ``[B, T, H * dh]`` as one slice per head ``[B, T, H, dh]`` (patching, ablation and EAP)."""
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
            x4 = split_heads(x, adapter).clone()  # [B, T, H, dh]; never edit the caller's tensor in place
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


@contextlib.contextmanager
def w_o_inputs(adapter: Adapter, store) -> Iterator[None]:
    """Within the block, a forward pass calls ``store(layer, x)`` with every layer's W_O input ``x``
    ``[B, T, H*dh]`` (every head's output, before the output projection mixes them)."""

    def make_hook(l: int):
        def pre(_module, args, kwargs):
            store(l, args[0] if args else kwargs["input"])

        return pre

    handles = []
    try:
        for l, layer in enumerate(adapter.layers()):
            handles.append(adapter.head_output_module(layer).register_forward_pre_hook(make_hook(l), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def head_outputs(model, adapter: Adapter, input_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Every head's output (W_O's input) in one forward pass.

    Returns ``(acts [L, B, T, H, dh], logits [B, V])`` (logits at the last position).
    """
    input_ids = check_ids(input_ids)
    acts: dict[int, torch.Tensor] = {}
    with w_o_inputs(adapter, lambda l, x: acts.__setitem__(l, split_heads(x, adapter).detach().clone())):
        logits = last_logits(model, input_ids)
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
    clean_ids, corrupt_ids, answer_ids, wrong_ids = check_twins(clean_ids, corrupt_ids, answer_ids, wrong_ids)
    batch_size = check_batch_size(batch_size)
    P = clean_ids.shape[0]
    s = adapter.shape
    corrupt_acts, corrupt_logits = head_outputs(model, adapter, corrupt_ids)  # [L, P, T, H, dh]
    ld_corrupt = logit_diff(corrupt_logits, answer_ids, wrong_ids)
    ld_clean = logit_diff(last_logits(model, clean_ids), answer_ids, wrong_ids)
    # every (prompt, layer, head), prompt-major
    grid = torch.cartesian_prod(torch.arange(P), torch.arange(s.n_layers), torch.arange(s.n_heads))  # [K, 3]
    ld_patched = torch.empty(P, s.n_layers, s.n_heads)
    with progress_bar(grid.shape[0], "patching", progress) as bar:
        for sl in batches(grid.shape[0], batch_size):
            p, l, h = grid[sl].unbind(1)
            rows = torch.arange(p.numel())
            with replace_heads(model, adapter, rows, l, h, source=corrupt_acts, source_rows=p):
                ld = logit_diff(last_logits(model, clean_ids[p]), answer_ids[p], wrong_ids[p])
            ld_patched[p, l, h] = ld.cpu()
            bar.update(p.numel())
    return PatchingResult(
        ld_clean=ld_clean.cpu().numpy(), ld_corrupt=ld_corrupt.cpu().numpy(), ld_patched=ld_patched.numpy()
    )


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
    input_ids = check_ids(input_ids)
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
    input_ids = check_ids(input_ids)
    batch_size = check_batch_size(batch_size)
    P = input_ids.shape[0]
    answer_ids = check_targets(answer_ids, P, "answer_ids")
    wrong_ids = check_targets(wrong_ids, P, "wrong_ids")
    masks = torch.as_tensor(np.asarray(masks)).bool()
    s = adapter.shape
    if masks.dim() != 3 or masks.shape[1:] != (s.n_layers, s.n_heads):
        raise InputError(f"masks must have shape [C, L={s.n_layers}, H={s.n_heads}]; got {tuple(masks.shape)}")
    C = masks.shape[0]
    grid = torch.cartesian_prod(torch.arange(C), torch.arange(P)).reshape(-1, 2)  # [C*P, 2] (config, prompt)
    out = torch.empty(C, P)
    for sl in batches(grid.shape[0], batch_size):
        c, p = grid[sl].unbind(1)
        row_means = None
        if mode == "mean":
            if means is None:
                raise InputError("mode='mean' needs means (flowray.baselines.head_means of a reference batch)")
            row_means = means if means.dim() == 4 else means[:, p]
        logits = ablate_heads(model, adapter, input_ids[p], masks[c], mode=mode, means=row_means)
        out[c, p] = logit_diff(logits, answer_ids[p], wrong_ids[p]).cpu()
    return out.numpy()
