"""Edge importances by ALTI proximity (paper section 2.1). Tensors in, tensors out; no model in sight.

A node ``y`` is a sum of parts ``z_k``; ``prox(z, y) = max(||y||_1 - ||y - z||_1, 0)`` and
``importance(z_k, y) = prox(z_k, y) / sum_i prox(z_i, y)`` (0 for every part when all proximities are 0).

Attention sub-edges are ``z = a * F`` with ``a = alpha^h_{pos,j}`` and ``F = f^h(x_j)``, the head's value
at ``j`` (value bias included) times its slice of W_O. There are ``H * T^2 / 2`` of them per layer, each of
dimension ``d``; materialising them (the official implementation) costs ``T^2 * H * d`` memory. We never do.

The trick. With ``s = sign(y)`` (``sign(0) := +1``) every coordinate satisfies, exactly,

    |y_d - a F_d| = |y_d| - a s_d F_d + 2 * relu(a s_d F_d - |y_d|)

so ``prox(aF, y) = relu(a (s . F) - 2 * sum_d relu(a s_d F_d - |y_d|))``. The first term is a matrix
product, and ``s . F = (s W_O^h) . v_j`` even costs ``d_head`` instead of ``d`` per pair. The correction
term is non-zero only on coordinates where ``a |F_d| > |y_d|``, i.e. where the part overshoots the whole;
all of them lie among the ``n = #{d : |y_d| < a * max|F|}`` smallest coordinates of ``|y|``. Pairs with
``a * s.F <= 0`` need no correction at all (their proximity is 0), nor do pairs with ``n = 0``.

Two backends compute the correction, with the same matrix products in torch:

- ``"cpu"``: a compiled loop (``flowray.cpu_kernel``, numba) that visits each sub-edge once and takes its
  cheapest exact case: no correction, the few smallest coordinates of ``|y|``, or a vectorised ``O(d)``
  distance; it writes straight into the result and also normalises there.
- ``"torch"``: vectorised torch for any device: chunks of query positions, the smallest coordinates of
  ``|y|`` once per position (``topk``) and a ragged gather over the ``n`` candidates; the rare pairs with
  more than ``dense_rank`` candidates get a direct ``O(d)`` distance instead.

The result is exact, not an approximation: the tests compare both with a materialising float64
reference. Inputs may be float16/bfloat16 (a half-precision model's own activations); every product and
sum runs in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flowray import cpu_kernel

BACKENDS = ("auto", "cpu", "torch")
# Elements (not bytes) of the per-chunk [H, C, T] work tensors and of one ragged correction batch.
DEFAULT_ELEMENT_BUDGET = 1 << 22
# Above this many crossing candidates a pair's proximity is computed directly over all d coordinates:
# a contiguous row beats that many scattered gathers (measured on SmolLM2, bench/importance_speed.py).
DEFAULT_DENSE_RANK = 64
# Query positions per chunk when the caller sets none (SmolLM2 at 512 tokens: 4 chunks per layer).
DEFAULT_CHUNK = 128


@dataclass(frozen=True)
class NodeImportances:
    """Importances of one node type's parts for every position of one layer."""

    attn: torch.Tensor | None  # [H, T, T]  sub-edge (head h, pos, source j); 0 for j > pos
    direct: torch.Tensor  # [K, T]  the direct parts (residual, FFN, ...) in the order given


def proximity(parts: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``prox(z, y)`` for parts ``[K, T, d]`` of nodes ``[T, d]`` -> ``[K, T]``."""
    y_norm = y.abs().sum(-1)  # [T]
    return (y_norm - (y - parts).abs().sum(-1)).clamp_min(0)


def head_outputs(values: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """``f^h(x_j)`` for every head and source: values ``[H_kv, T, dh]``, W_O ``[H, dh, d]`` -> ``[H, T, d]``.

    Values ``[G, H_kv, T, dh]`` of ``G`` sequences give ``[G, H, T, d]``: a view of one ``[H, G * T, d]``
    product (one GEMM per head, where broadcasting W_O over ``G`` would copy it ``G`` times).
    """
    H, dh, d = w_o.shape
    v = values.repeat_interleave(H // values.shape[-3], dim=-3)  # [(G,) H, T, dh]; head h reads kv head h // group
    if v.dim() == 3:
        return torch.bmm(v, w_o)  # [H, T, d]
    G, _, T, _ = v.shape
    return torch.bmm(v.transpose(0, 1).reshape(H, G * T, dh), w_o).view(H, G, T, d).transpose(0, 1)


@dataclass(frozen=True)
class HeadOutputs:
    """One layer's head outputs for one sequence, computed once and read by every chunk of query rows.

    ``head_outputs_of`` a ``[G, H_kv, T, dh]`` batch gives the ``G`` sequences' outputs at once (a leading
    ``G`` on values, F and f_max), which ``sub_edge_block`` reads.
    """

    values: torch.Tensor  # [H_kv, T, dh] float32, value bias included
    w_o: torch.Tensor  # [H, dh, d] float32
    w_flat: torch.Tensor  # [d, H * dh]  W_O^T of every head side by side: s_p W_O^h^T for all h in one GEMM
    F: torch.Tensor  # [H, T, d]  f^h(x_j) = v_j W_O^h
    f_max: torch.Tensor  # [H, T]   max_d |F_hj|: bounds which coordinates a sub-edge can overshoot


def head_outputs_of(values: torch.Tensor, w_o: torch.Tensor, *, backend: str = "auto",
                    w_flat: torch.Tensor | None = None) -> HeadOutputs:
    """``HeadOutputs`` from values ``[H_kv, T, dh]`` (or ``[G, H_kv, T, dh]``) and W_O ``[H, dh, d]`` (any
    float dtype).

    ``w_flat``: ``flat_output_projection(w_o)``, when the caller computes it once for several sequences.
    """
    H = w_o.shape[0]
    if values.shape[-3] == 0 or H % values.shape[-3]:
        raise ValueError(f"query heads H={H} must be a multiple of kv heads H_kv={values.shape[-3]}")
    values, w_o = values.float(), w_o.float()
    F = head_outputs(values, w_o)  # [(G,) H, T, d]
    if resolve_backend(backend, F.device) == "cpu":
        base = F if F.dim() == 3 else F.transpose(0, 1)  # contiguous: [H, T, d] or [H, G, T, d]
        T, d = F.shape[-2:]
        f_max = torch.from_numpy(cpu_kernel.f_max(base.reshape(-1, T, d).numpy(), torch.get_num_threads()))
        f_max = f_max.view(base.shape[:-1]) if F.dim() == 3 else f_max.view(base.shape[:-1]).transpose(0, 1)
    else:
        f_max = F.abs().amax(-1)
    if w_flat is None:
        w_flat = flat_output_projection(w_o)
    return HeadOutputs(values=values, w_o=w_o, w_flat=w_flat, F=F, f_max=f_max)


def flat_output_projection(w_o: torch.Tensor) -> torch.Tensor:
    """``[H, dh, d]`` -> ``[d, H * dh]`` float32 contiguous (column block h is ``W_O^h^T``)."""
    H, dh, d = w_o.shape
    return w_o.float().permute(2, 0, 1).reshape(d, H * dh).contiguous()


def sub_edge_rows(
    y: torch.Tensor,
    probs: torch.Tensor,
    heads: HeadOutputs,
    p0: int = 0,
    *,
    backend: str = "auto",
    element_budget: int = DEFAULT_ELEMENT_BUDGET,
    dense_rank: int = DEFAULT_DENSE_RANK,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Proximities of the sub-edges of ``C`` consecutive query rows, positions ``p0 .. p0 + C - 1``.

    Args:
        y: ``[C, d]`` the rows' nodes, float32.
        probs: ``[H, C, J]`` their attention weights over sources ``j < J`` (``J >= p0 + C``; entries with
            ``j > p`` are ignored).
        heads: the layer's ``HeadOutputs`` (``T >= J`` sources).
        out: optional contiguous float32 ``[H, C, J]`` tensor to write into.
    Returns:
        ``[H, C, J]`` proximities, zero for ``j > p``.
    """
    H, C, J = probs.shape
    backend = resolve_backend(backend, y.device)
    if out is None:
        out = torch.empty(H, C, J, dtype=torch.float32, device=y.device)
    if backend == "cpu":
        batched = HeadOutputs(heads.values[None], heads.w_o, heads.w_flat, heads.F[None], heads.f_max[None])
        sub_edge_block(y[None], probs[None], batched, p0, out=out[None])
        return out
    out.copy_(_sub_edge_rows_torch(y.float(), probs.float(), heads, p0, element_budget, dense_rank))
    return out


def sub_edge_block(y: torch.Tensor, probs: torch.Tensor, heads: HeadOutputs, p0: int = 0, *,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``sub_edge_rows`` of ``G`` sequences at once on the CPU kernel: the same ``C`` rows of each.

    y ``[G, C, d]``, probs ``[G, H, C, J]``, heads from ``head_outputs_of`` a ``[G, H_kv, T, dh]`` batch;
    out: optional contiguous float32 ``[G, H, C, J]``. Rows of a right-padded batch read only sources before
    them, so whole sequences of different lengths share one call on the padded grid (their padded rows get
    values nobody reads). Returns ``[G, H, C, J]`` proximities, zero for ``j > p``.
    """
    G, H, C, J = probs.shape
    if out is None:
        out = torch.empty(G, H, C, J, dtype=torch.float32, device=y.device)
    y, probs = y.float(), probs.float()
    values = heads.values  # [G, H_kv, T, dh]
    H_kv, dh = values.shape[1], heads.w_o.shape[1]
    # sign(y) with -1 for -0.0: any sign works where y_d = 0 (|0 - aF| = -a s F + 2 relu(a s F) for
    # s = +-1), and copysign is 10x faster than a where()
    s = torch.ones_like(y).copysign_(y)  # [G, C, d]
    Gs = (s.view(G * C, -1) @ heads.w_flat).view(G, C, H, dh).transpose(1, 2)  # [G, H, C, dh] s_p W_O^h^T
    # s_p . F_hj = G_hp . v_j, one GEMM per kv head: its query heads' rows of G stacked ([group * C, dh])
    torch.matmul(Gs.reshape(G, H_kv, -1, dh), values[:, :, :J].transpose(-1, -2), out=out.view(G, H_kv, -1, J))
    # the kernel reads F and f_max head-major ([H, G, ...]: how head_outputs lays a batch out) and compiles
    # for contiguous arrays: a strided F view made it 2x slower (its O(d) loops no longer vectorise)
    F, f_max = heads.F.transpose(0, 1).contiguous(), heads.f_max.transpose(0, 1).contiguous()
    cpu_kernel.prox_rows(out.numpy(), probs.contiguous().numpy(), F.numpy(), f_max.numpy(),
                         y.contiguous().numpy(), p0, torch.get_num_threads())
    return out


def sub_edge_proximity(
    y: torch.Tensor,
    probs: torch.Tensor,
    values: torch.Tensor,
    w_o: torch.Tensor,
    *,
    chunk_size: int | None = None,
    element_budget: int = DEFAULT_ELEMENT_BUDGET,
    dense_rank: int = DEFAULT_DENSE_RANK,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Proximity of every attention sub-edge ``alpha^h_{pos,j} f^h(x_j)`` to its node ``y_pos``.

    Args:
        y: ``[T, d]`` the attention node ``x^{lA}`` (or ``x^l`` for parallel blocks), float32.
        probs: ``[H, T, T]`` attention weights ``alpha[h, pos, j]``; entries with ``j > pos`` are ignored.
        values: ``[H_kv, T, dh]`` value vectors (value bias included); H must be a multiple of H_kv.
        w_o: ``[H, dh, d]`` each head's slice of the output projection.
        chunk_size: query positions per chunk of the ``"torch"`` backend (peak extra memory ~
            ``H * chunk_size * T`` floats); None picks the largest chunk within ``element_budget``.
        dense_rank: pairs with more crossing candidates than this get a direct ``O(d)`` L1 distance
            instead of the ragged correction (same result; a speed knob only).
        backend: ``"cpu"`` (the compiled loop of ``flowray.cpu_kernel``; CPU tensors only), ``"torch"``
            (vectorised torch, any device; ``chunk_size``, ``element_budget`` and ``dense_rank`` apply
            to it) or ``"auto"`` (``"cpu"`` for CPU tensors when numba is installed, else ``"torch"``).
        out: optional float32 ``[H, T, T]`` tensor on ``y``'s device to write the result into.
    Returns:
        ``[H, T, T]`` proximities, zero for ``j > pos`` (``out`` when given).
    """
    H, T, _ = probs.shape
    if values.shape[0] == 0 or H % values.shape[0]:
        raise ValueError(f"query heads H={H} must be a multiple of kv heads H_kv={values.shape[0]}")
    backend = resolve_backend(backend, y.device)
    if out is None:
        out = torch.empty(H, T, T, dtype=torch.float32, device=y.device)
    elif out.shape != (H, T, T) or out.dtype != torch.float32 or out.device != y.device:
        raise ValueError(f"out must be a float32 [H, T, T] = {[H, T, T]} tensor on {y.device}; got "
                         f"{out.dtype} {list(out.shape)} on {out.device}")
    heads = head_outputs_of(values, w_o, backend=backend)
    y, probs = y.float(), probs.float()
    if backend == "cpu":  # one chunk: the compiled loop needs no bound on its work memory
        dest = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype)
        sub_edge_rows(y, probs, heads, 0, backend="cpu", out=dest)
        return dest if dest is out else out.copy_(dest)
    if chunk_size is None:
        # chunks skip the zero upper triangle; more than a few per layer only adds Python overhead
        chunk_size = max(1, min(DEFAULT_CHUNK, element_budget // max(1, H * T)))
    out.zero_()
    for p0 in range(0, T, chunk_size):
        p1 = min(T, p0 + chunk_size)
        # positions p0..p1-1 only read sources j < p1: the chunk is [H, C, p1], not [H, C, T]
        out[:, p0:p1, :p1] = _sub_edge_rows_torch(y[p0:p1], probs[:, p0:p1, :p1], heads, p0, element_budget,
                                                  dense_rank)
    return out


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` -> ``"cpu"`` or ``"torch"``; an unknown name or ``"cpu"`` off the CPU is a ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        return "cpu" if device.type == "cpu" and cpu_kernel.AVAILABLE else "torch"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' needs CPU tensors; got tensors on {device} (use 'torch' or 'auto')")
        if not cpu_kernel.AVAILABLE:
            raise ImportError("backend 'cpu' needs numba: pip install numba (or use backend='torch')")
    return backend


def _sub_edge_rows_torch(y, probs, heads: HeadOutputs, p0: int, element_budget, dense_rank) -> torch.Tensor:
    """The vectorised torch path for one chunk of rows (see ``sub_edge_rows``): a ragged gather corrects."""
    H, C, J = probs.shape
    d = y.shape[-1]
    values, w_o, F, F_max = heads.values, heads.w_o, heads.F, heads.f_max
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


def normalise(sub_prox: torch.Tensor | None, direct_prox: torch.Tensor, *, inplace: bool = False) -> NodeImportances:
    """Divide each node's proximities by their sum; nodes whose parts all have proximity 0 get all 0.

    sub_prox: ``[H, T, T]`` or None; direct_prox: ``[K, T]``. ``inplace`` scales ``sub_prox`` itself
    (no second ``[H, T, T]`` tensor at long contexts).
    """
    total = direct_prox.sum(0)  # [T]
    if sub_prox is not None:
        total = total + sub_prox.sum(dim=(0, 2))
    safe = torch.where(total > 0, total, torch.ones_like(total))
    scale = torch.where(total > 0, 1.0 / safe, torch.zeros_like(total))  # [T]
    if sub_prox is None:
        attn = None
    elif inplace:
        attn = sub_prox.mul_(scale[None, :, None])
    else:
        attn = sub_prox * scale[None, :, None]
    return NodeImportances(attn=attn, direct=direct_prox * scale[None, :])


def attention_node(
    y: torch.Tensor,
    direct_parts: torch.Tensor,
    probs: torch.Tensor,
    values: torch.Tensor,
    w_o: torch.Tensor,
    *,
    chunk_size: int | None = None,
    element_budget: int = DEFAULT_ELEMENT_BUDGET,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> NodeImportances:
    """Importances for nodes made of attention sub-edges plus direct parts.

    y ``[T, d]``; direct_parts ``[K, T, d]`` (residual; for parallel blocks also the FFN output);
    probs ``[H, T, T]``; values ``[H_kv, T, dh]``; w_o ``[H, dh, d]``. With ``out`` (float32
    ``[H, T, T]``) the sub-edge importances are written there and ``.attn`` is ``out``.
    """
    sub = sub_edge_proximity(
        y, probs, values, w_o, chunk_size=chunk_size, element_budget=element_budget, backend=backend, out=out
    )
    return finish_rows(sub, y, direct_parts, 0, backend=backend)


def finish_rows(sub: torch.Tensor | None, y: torch.Tensor, direct_parts: torch.Tensor, p0: int = 0, *,
                backend: str = "auto") -> NodeImportances:
    """Normalise a chunk of nodes: sub-edge proximities ``[H, C, J]`` (rows at positions ``p0 + r``; scaled
    in place) or None, nodes ``y`` ``[C, d]`` and direct parts ``[K, C, d]`` -> importances."""
    if resolve_backend(backend, y.device) == "cpu" and (sub is None or sub.is_contiguous()):
        node = finish_block(None if sub is None else sub[None], y[None], direct_parts[:, None], p0)
        return NodeImportances(attn=sub, direct=node.direct[:, 0])
    return normalise(sub, proximity(direct_parts.float(), y.float()), inplace=True)


def finish_block(sub: torch.Tensor | None, y: torch.Tensor, direct_parts: torch.Tensor, p0: int = 0
                 ) -> NodeImportances:
    """``finish_rows`` of ``G`` sequences at once on the CPU kernel: proximities ``[G, H, C, J]``
    (contiguous, scaled in place) or None, nodes ``[G, C, d]``, direct parts ``[K, G, C, d]`` -> importances
    (``.direct`` ``[K, G, C]``)."""
    G, C = y.shape[:2]
    sub_np = np.zeros((G, 0, C, C), dtype=np.float32) if sub is None else sub.numpy()
    direct = cpu_kernel.normalise_rows(sub_np, y.float().contiguous().numpy(),
                                       direct_parts.float().contiguous().numpy(), p0, torch.get_num_threads())
    return NodeImportances(attn=sub, direct=torch.from_numpy(direct))


def direct_node(y: torch.Tensor, direct_parts: torch.Tensor, *, backend: str = "auto") -> NodeImportances:
    """Importances for nodes made only of direct parts ``[K, T, d]`` (e.g. residual + FFN)."""
    return finish_rows(None, y, direct_parts, 0, backend=backend)
