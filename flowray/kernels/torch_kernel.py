"""The torch backend: vectorised torch for any device (chunks of rows, a ragged gather for the correction).

The smallest coordinates of ``|y|`` come once per row (``topk``); each sub-edge that needs a correction
gathers its ``n`` candidates; the rare ones with more than ``dense_rank`` candidates get a direct ``O(d)``
distance instead. Used on GPUs without Triton and as a second exact implementation in the tests.
"""

from __future__ import annotations

import torch

from flowray.kernels.base import HeadOutputs, Kernel, float32_head_outputs, proximity


class TorchKernel(Kernel):
    name = "torch"

    def head_outputs(self, values, w_o, w_flat=None) -> HeadOutputs:
        return float32_head_outputs(values, w_o, w_flat, lambda F: F.abs().amax(-1))

    def sub_edge_block(self, y, probs, heads: HeadOutputs, p0: int = 0, *, out=None) -> torch.Tensor:
        G, H, C, J = probs.shape
        if out is None:
            out = torch.empty(G, H, C, J, dtype=torch.float32, device=y.device)
        budget = self.config.budget(y.device)
        for g in range(G):
            one = HeadOutputs(heads.values[g], heads.w_o, heads.w_flat, heads.F[g], heads.f_max[g])
            out[g] = sub_edge_rows(y[g].float(), probs[g].float(), one, p0, budget, self.config.dense_rank)
        return out

    def finish_block(self, sub, y, parts, p0: int = 0) -> torch.Tensor:
        y = y.float()
        direct = proximity(torch.stack([z.float() for z in parts]), y)  # [K, G, C]
        total = direct.sum(0)
        if sub is not None:
            total = total + sub.sum(dim=(1, 3))
        scale = torch.where(total > 0, 1.0 / torch.where(total > 0, total, torch.ones_like(total)),
                            torch.zeros_like(total))  # [G, C]
        if sub is not None:
            sub.mul_(scale[:, None, :, None])
        return direct * scale[None]


def sub_edge_rows(y, probs, heads: HeadOutputs, p0: int, element_budget, dense_rank) -> torch.Tensor:
    """Proximities ``[H, C, J]`` of ``C`` rows ``y`` ``[C, d]`` (positions ``p0 ..``) with weights ``probs``
    ``[H, C, J]``, for one sequence's head outputs (``F`` ``[H, T, d]``): a ragged gather corrects."""
    H, C, J = probs.shape
    d = y.shape[-1]
    values, F, F_max = heads.values, heads.F, heads.f_max
    group = H // values.shape[0]
    s = torch.where(y >= 0, 1.0, -1.0).to(y.dtype)  # [C, d]
    G = (s @ heads.w_flat).view(C, H, -1).transpose(0, 1)  # [H, C, dh]  s_p W_O^h^T, so s_p . F_hj = G_hp . v_j
    v_t = values[:, :J].repeat_interleave(group, dim=0).transpose(1, 2)  # [H, dh, J]
    # only the dense_rank + 1 smallest |y| coordinates matter: pairs reaching beyond go the dense way
    width = min(dense_rank + 1, d)
    small_abs_y, order = torch.topk(y.abs(), width, dim=-1, largest=False, sorted=True)  # [C, width]
    small_y = torch.gather(y, 1, order)  # [C, width]  y at those coordinates, ascending |y|
    max_n = min(dense_rank, d)  # ragged pairs have 1 <= n <= max_n crossing candidates
    causal = torch.arange(J, device=y.device)[None, :] <= torch.arange(p0, p0 + C, device=y.device)[:, None]
    a = probs * causal  # [H, C, J]
    lin = a * torch.bmm(G, v_t)  # [H, C, J]  a * (s . F)
    thr = a * F_max[:, None, :J]  # [H, C, J]  only coordinates with |y_d| < thr can cross
    prox = lin.clamp_min(0)  # exact for every pair with no crossing candidate
    # lin <= 0 means prox 0 whatever the correction; thr <= min|y| means no coordinate can cross
    cand = (lin > 0) & (thr > small_abs_y[:, 0][None, :, None])
    flat = torch.nonzero(cand.view(-1)).squeeze(1)  # [Q] into the [H, C, J] chunk
    if flat.numel():
        a_q, thr_q, lin_q = a.view(-1)[flat], thr.view(-1)[flat], lin.view(-1)[flat]
        h_q = torch.div(flat, C * J, rounding_mode="floor")
        r_q = torch.div(flat, J, rounding_mode="floor") % C  # row within the chunk
        j_q = flat % J
        if width > max_n:  # thr > u_{max_n}: more than max_n candidates -> direct L1 over all d
            dense = thr_q > small_abs_y[r_q, max_n]
        else:
            dense = torch.zeros_like(cand.view(-1)[flat])
        new = torch.empty_like(lin_q)
        if bool(dense.any()):
            yd = y[r_q[dense]]  # [Qd, d]
            dist = (yd - a_q[dense, None] * F[h_q[dense], j_q[dense]]).abs().sum(-1)  # [Qd]
            new[dense] = (yd.abs().sum(-1) - dist).clamp_min(0)
        sp = ~dense
        n = _count_below(small_abs_y, r_q[sp], thr_q[sp], max_n)  # [Qs] exact, in [1, max_n]
        corr = _ragged_correction(n, a_q[sp], h_q[sp], r_q[sp], j_q[sp], F, small_y, order, element_budget)
        new[sp] = (lin_q[sp] - 2 * corr).clamp_min(0)
        prox.view(-1)[flat] = new
    return prox


def _count_below(sorted_rows: torch.Tensor, rows: torch.Tensor, thr: torch.Tensor, hi_bound: int) -> torch.Tensor:
    """``#{r : sorted_rows[row, r] < thr}`` per query, known to lie in ``[1, hi_bound]``: binary search.

    sorted_rows ``[T, W]`` ascending with ``W > hi_bound - 1``; rows, thr ``[Q]``. Returns int64 ``[Q]``.
    """
    width = sorted_rows.shape[1]
    flat = sorted_rows.reshape(-1)
    base = rows * width
    lo = torch.ones_like(rows)  # invariant: sorted_rows[row, :lo] < thr
    hi = torch.full_like(rows, hi_bound)  # invariant: sorted_rows[row, hi:] >= thr (or hi == width)
    for _ in range(max(1, hi_bound).bit_length()):
        active = lo < hi
        mid = torch.div(lo + hi, 2, rounding_mode="floor").clamp_max(width - 1)
        below = flat[base + mid] < thr
        lo = torch.where(active & below, mid + 1, lo)
        hi = torch.where(active & ~below, mid, hi)
    return lo


def _ragged_correction(
    counts: torch.Tensor,
    a: torch.Tensor,
    h: torch.Tensor,
    p: torch.Tensor,
    j: torch.Tensor,
    F: torch.Tensor,
    sorted_y: torch.Tensor,
    order: torch.Tensor,
    element_budget: int,
) -> torch.Tensor:
    """``sum_{r < n} relu(a s_d F_d - |y_d|)`` over the ``n`` smallest-|y| coordinates ``d = order[p, r]``.

    counts, a, h, p, j: ``[Q]`` one entry per pair (``p`` absolute position); F: ``[H, T, d]``;
    sorted_y, order: ``[T, W]`` (y and its coordinate ids in ascending-|y| order, ``W >= max n``).
    Returns ``[Q]``.
    """
    Q = counts.numel()
    corr = torch.zeros(Q, dtype=a.dtype, device=a.device)
    if Q == 0:
        return corr
    T, width = order.shape
    d = F.shape[-1]
    ends = torch.cumsum(counts, 0)  # [Q]
    # batches of consecutive pairs holding about element_budget coordinates (plus at most one pair's n)
    if int(ends[-1]) <= element_budget:
        bounds = [Q]
    else:
        batch_of = torch.div(ends - 1, element_budget, rounding_mode="floor")  # [Q], non-decreasing
        bounds = torch.cumsum(torch.unique_consecutive(batch_of, return_counts=True)[1], 0).tolist()
    sorted_flat, order_flat, F_flat = sorted_y.reshape(-1), order.reshape(-1), F.reshape(-1)
    start = 0
    for stop in bounds:
        c = counts[start:stop]  # [q]
        first = torch.cumsum(c, 0) - c  # [q] where each pair's run starts
        E = int(first[-1] + c[-1])
        # element e of pair q sits at rank e - first[q] of row p[q] of the sorted arrays
        row = torch.repeat_interleave(p[start:stop] * width - first, c)  # [E]
        idx = torch.arange(E, device=c.device) + row  # [E] into sorted_y / order, flattened
        y_e = sorted_flat[idx]  # [E]
        f_base = torch.repeat_interleave((h[start:stop] * F.shape[1] + j[start:stop]) * d, c)  # [E]
        aF = torch.repeat_interleave(a[start:stop], c) * F_flat[f_base + order_flat[idx]]  # [E]
        diff = aF - y_e
        term = torch.where(y_e >= 0, diff, -diff).clamp_min_(0)  # relu(s (aF - y)) = relu(a s F - |y|)
        corr[start:stop] = torch.segment_reduce(term, "sum", lengths=c)
        start = stop
    return corr
