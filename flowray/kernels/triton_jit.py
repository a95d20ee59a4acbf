"""The Triton programs of flowray's GPU backend (``flowray.kernels.triton_kernel`` launches them).

Notation as in ``flowray.importance``: a layer's attention node ``y_p`` (``[d]``) has sub-edges
``a F_hj`` with ``a = alpha^h_{p,j}`` and ``F_hj = v_j W_O^h``; ``s = sign(y_p)``; ``lin = a (s . F_hj)``;
the proximity is ``relu(lin - 2 * sum_k relu(a s_k F_hjk - |y_pk|))``, and only the coordinates with
``|y_pk| < thr = a max|F_hj|`` (the ``n`` smallest of ``|y_p|``) can make the correction non-zero.

One block is ``G`` sequences' query rows ``r`` (grid positions ``p = p0 + r``) over sources ``j < J`` of a
common padded grid; sequence ``g`` is real on ``[start_g, start_g + len_g)`` (left or right padding).
The programs, per block and layer:

- ``sign_gemm``: ``Gs = sign(y) W_O^T`` (``[G*C, H*dh]``): with half-precision weights the products
  ``+-w`` are exact, so a tensor-core product with float32 accumulation gives the float32 result;
- ``head_outputs_t``: ``F^T`` (``[G, H, d, TF]``, sources contiguous) and ``f_max`` for a window of sources;
- ``prox_tiles``: per tile of ``[BP, BJ]`` sub-edges, ``lin`` from ``Gs . v`` and each sub-edge's exact
  case: 0, ``lin`` (nothing overshoots), the correction over the ``W1`` smallest coordinates in one loop
  over the tile, or (more candidates than that) appended to one of two lists for ``prox_list``;
- ``prox_list``: the listed sub-edges, each over its own number of candidate coordinates;
- ``finish_rows``: per block of rows, the direct parts' proximities, the node totals and normalisation,
  then in one pass each head's row sum, the previous-token, same-word and source sums and the sub-edges
  above ``tau`` (into per-node slots, in (head, source) order: deterministic);
- ``direct_rows``: nodes made only of direct parts (the block node of sequential blocks).

Everything is float32 except the tensor-core operands (the model's own half-precision weights and
values, exactly representable). Under ``TRITON_INTERPRET=1`` (tests on CPUs) the launcher passes
``UPCAST=True``: the interpreter has no half-precision dot, so operands are cast to float32 first.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, EXACT: tl.constexpr):
    """``a @ b`` with float32 accumulation; EXACT: float32 operands multiplied in full float32 (no TF32)."""
    if EXACT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _split_dot(a, b, EC: tl.constexpr):
    """``a @ b`` for float32 ``a`` and bfloat16 ``b`` at float32 accuracy on bfloat16 tensor cores: ``a`` is
    split into three bfloat16 terms whose sum is ``a`` exactly (8 significant bits each), every product
    with ``b`` is exact, and the three products accumulate in float32."""
    hi = a.to(tl.bfloat16)
    rest = a - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    return tl.dot(hi, b) + tl.dot(mid, b) + tl.dot(lo, b)


@triton.jit(do_not_specialize=["M"])
def sign_gemm(y_ptr, w_ptr, out_ptr, M, N, K, s_ym, s_wk, s_wn, s_om,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EXACT: tl.constexpr):
    """``out[m, n] = sum_k sign(y[m, k]) w[k, n]``; y float32 ``[M, K]``, w ``[K, N]``, out float32."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        yv = tl.load(y_ptr + rm[:, None] * s_ym + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + kk[:, None] * s_wk + rn[None, :] * s_wn, mask=(kk[:, None] < K) & (rn[None, :] < N),
                    other=0.0)
        s = tl.where(yv < 0, -1.0, 1.0)  # sign(0) := +1 (any sign is exact where y_d = 0)
        acc += _dot(s.to(w.dtype), w, EXACT)
    tl.store(out_ptr + rm[:, None] * s_om + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit(do_not_specialize=["t0", "TF", "T"])
def head_outputs_t(v_ptr, w_ptr, ft_ptr, fmax_ptr, H, d, dh, group, t0, TF, T,
                   s_vg, s_vh, s_vt, s_ve, s_wk, s_wn,
                   BT: tl.constexpr, BK: tl.constexpr, DH: tl.constexpr, STORE: tl.constexpr, EXACT: tl.constexpr):
    """``F^T[g, h, k, t - t0] = sum_e v[g, h // group, t, e] W_O^T[k, h * dh + e]`` for sources ``t`` in
    ``[t0, t0 + TF)`` (``ft`` ``[G, H, d, TF]`` float32, written when STORE) and ``f_max[g, h, t - t0] =
    max_k |F|`` (``[G, H, TF]``). v ``[G, H_kv, T, dh]`` (strided); w = W_O^T ``[d, H * dh]``."""
    g = tl.program_id(2)
    h = tl.program_id(1)
    t = t0 + tl.program_id(0) * BT + tl.arange(0, BT)
    t_ok = (t < t0 + TF) & (t < T)
    e = tl.arange(0, DH)
    e_ok = e < dh
    v = tl.load(v_ptr + g * s_vg + (h // group) * s_vh + t[:, None] * s_vt + e[None, :] * s_ve,
                mask=t_ok[:, None] & e_ok[None, :], other=0.0)  # [BT, DH]
    vt = tl.trans(v)  # [DH, BT]
    fmax = tl.zeros((BT,), dtype=tl.float32)
    row = (g * H + h) * d
    for k0 in range(0, d, BK):
        kk = k0 + tl.arange(0, BK)
        w = tl.load(w_ptr + kk[:, None] * s_wk + (h * dh + e)[None, :] * s_wn,
                    mask=(kk[:, None] < d) & e_ok[None, :], other=0.0)  # [BK, DH]
        f = _dot(w, vt.to(w.dtype), EXACT)  # [BK, BT]
        fmax = tl.maximum(fmax, tl.max(tl.abs(f), axis=0))
        if STORE:
            tl.store(ft_ptr + (row + kk)[:, None].to(tl.int64) * TF + (t - t0)[None, :], f,
                     mask=(kk[:, None] < d) & t_ok[None, :])
    tl.store(fmax_ptr + (g * H + h) * TF + (t - t0), fmax, mask=t_ok)


@triton.jit
def _append(mask, count_ptr, list_ptr, cap, flat):
    """Append the flat indices where ``mask`` ([BP, BJ]) holds to a list through an atomic counter;
    returns the entries that did not fit (``>= cap``)."""
    m32 = mask.to(tl.int32)
    per_row = tl.sum(m32, axis=1)  # [BP]
    n = tl.sum(per_row, axis=0)
    full = mask & (m32 < 0)  # none
    if n > 0:  # no atomic for a tile with nothing to list
        base = tl.atomic_add(count_ptr, n)
        slot = base + (tl.cumsum(per_row, axis=0) - per_row)[:, None] + tl.cumsum(m32, axis=1) - 1
        tl.store(list_ptr + slot, flat, mask=mask & (slot < cap))
        full = mask & (slot >= cap)
    return full


@triton.jit(do_not_specialize=["C", "J", "p0", "js", "je", "TF", "n_jbw", "cap_mid", "cap_big", "s_pg", "s_ph",
                               "s_pr", "s_sg"])
def prox_tiles(gs_ptr, v_ptr, probs_ptr, scale_ptr, fmax_ptr, ft_ptr, y_ptr, sy_ptr, sidx_ptr, sabs_ptr,
               start_ptr, len_ptr, prox_ptr, count_ptr, mid_ptr, big_ptr,
               H, C, J, d, dh, group, p0, js, je, TF, n_jbw, cap_mid, cap_big,
               s_gs, s_vg, s_vh, s_vt, s_ve, s_pg, s_ph, s_pr, s_pj, s_sg, s_sr,
               W1: tl.constexpr, W1P: tl.constexpr, W2: tl.constexpr, BP: tl.constexpr, BJ: tl.constexpr,
               DH: tl.constexpr, EC: tl.constexpr, BK: tl.constexpr, HAS_SCALE: tl.constexpr, SPLIT: tl.constexpr):
    """Sub-edge proximities of one ``[BP, BJ]`` tile (rows ``r``, sources ``j`` in ``[js, je)``) into
    ``prox`` ``[G, H, C, J]``; sub-edges with more than ``W1`` candidate coordinates get ``lin`` there and
    their flat index in the ``mid`` (at most ``W2`` candidates) or ``big`` list, which ``prox_list`` finishes
    (``count[0]``, ``count[1]``: their lengths). ``s . F = Gs . v`` runs over ``EC`` head dimensions at a
    time, on bfloat16 tensor cores (``SPLIT``, bfloat16 values) or in float32 FMAs.
    A list that is full makes the tile compute those sub-edges itself over all ``d`` coordinates."""
    g = tl.program_id(2)
    h = tl.program_id(1)
    pb = tl.program_id(0) // n_jbw
    r = pb * BP + tl.arange(0, BP)
    j = js + (tl.program_id(0) % n_jbw) * BJ + tl.arange(0, BJ)
    p = p0 + r
    start = tl.load(start_ptr + g)
    length = tl.load(len_ptr + g)
    row_ok = (r < C) & (p >= start) & (p < start + length)
    ok = row_ok[:, None] & (j[None, :] >= start) & (j[None, :] <= p[:, None]) & (j[None, :] < je)
    flat = ((g * H + h) * C + r)[:, None].to(tl.int64) * J + j[None, :]  # [BP, BJ] into prox
    val = tl.zeros((BP, BJ), dtype=tl.float32)
    if tl.max(ok.to(tl.int32)) > 0:
        m = g * C + r  # rows of y and of the sorted arrays
        dot = tl.zeros((BP, BJ), dtype=tl.float32)  # s_p . F_hj = Gs_hp . v_j
        for e0 in tl.static_range(0, DH, EC):
            e = e0 + tl.arange(0, EC)
            e_ok = e < dh
            gs = tl.load(gs_ptr + m[:, None] * s_gs + (h * dh + e)[None, :],
                         mask=(r < C)[:, None] & e_ok[None, :], other=0.0)  # [BP, EC] float32
            v = tl.load(v_ptr + g * s_vg + (h // group) * s_vh + j[:, None] * s_vt + e[None, :] * s_ve,
                        mask=(j < je)[:, None] & e_ok[None, :], other=0.0)  # [BJ, EC]
            if SPLIT:
                dot += _split_dot(gs, tl.trans(v), EC)
            else:
                dot += _dot(gs, tl.trans(v), True)
        a = tl.load(probs_ptr + g * s_pg + h * s_ph + r[:, None] * s_pr + j[None, :] * s_pj, mask=ok,
                    other=0.0).to(tl.float32)
        if HAS_SCALE:
            a = a * tl.load(scale_ptr + g * s_sg + r * s_sr, mask=r < C, other=0.0)[:, None]
        lin = a * dot
        fm = tl.load(fmax_ptr + (g * H + h) * TF + (j - js), mask=j < je, other=0.0)
        thr = a * fm[None, :]
        d_row = m.to(tl.int64) * d
        smallest = tl.load(sabs_ptr + d_row, mask=r < C, other=float("inf"))
        bound = tl.load(sabs_ptr + d_row + W1, mask=(r < C) & (r * 0 + W1 < d), other=float("inf"))
        pos = ok & (lin > 0)
        cand = pos & (thr > smallest[:, None])
        listed = cand & (thr > bound[:, None])  # more than W1 coordinates can overshoot
        few = cand & (thr <= bound[:, None])
        # the loop over the W1 smallest coordinates stops at the tile's largest count among `few` sub-edges
        row_thr = tl.max(tl.where(few, thr, 0.0), axis=1)  # [BP]
        # the rows' W1 smallest |y| (value, signed value, coordinate) in one load each, not one per step
        qs = tl.arange(0, W1P)
        at_q = (r < C)[:, None] & (qs < W1)[None, :] & (qs[None, :] < d)
        sab_w = tl.load(sabs_ptr + d_row[:, None] + qs[None, :], mask=at_q, other=float("inf"))  # [BP, W1P]
        sy_w = tl.load(sy_ptr + d_row[:, None] + qs[None, :], mask=at_q, other=0.0)
        sidx_w = tl.load(sidx_ptr + d_row[:, None] + qs[None, :], mask=at_q, other=0)
        n_tile = tl.max(tl.sum((sab_w < row_thr[:, None]).to(tl.int32), axis=1), axis=0)
        over = tl.zeros((BP, BJ), dtype=tl.float32)
        f_row = (g * H + h).to(tl.int64) * d
        for q in range(0, n_tile):
            pick = qs[None, :] == q
            yq = tl.sum(tl.where(pick, sy_w, 0.0), axis=1)  # [BP] y at its q-th smallest |y|
            kq = tl.sum(tl.where(pick, sidx_w, 0), axis=1)
            fq = tl.load(ft_ptr + (f_row + kq)[:, None] * TF + (j - js)[None, :], mask=few, other=0.0)
            sq = tl.where(yq < 0, -1.0, 1.0)
            over += tl.maximum(a * sq[:, None] * fq - tl.abs(yq)[:, None], 0.0)
        val = tl.where(few, lin - 2.0 * over, lin)
        mid_bound = tl.load(sabs_ptr + d_row + W2, mask=(r < C) & (r * 0 + W2 < d), other=float("inf"))
        big = listed & (thr > mid_bound[:, None])
        full = _append(listed & ~big, count_ptr, mid_ptr, cap_mid, flat)
        full = full | _append(big, count_ptr + 1, big_ptr, cap_big, flat)
        if tl.max(full.to(tl.int32)) > 0:  # a list was full: every coordinate, for this tile's leftovers
            kb = tl.arange(0, BK)
            acc = tl.zeros((BP, BJ), dtype=tl.float32)
            for k0 in range(0, d, BK):
                kk = k0 + kb
                yk = tl.load(y_ptr + d_row[:, None] + kk[None, :], mask=(r < C)[:, None] & (kk < d)[None, :],
                             other=0.0)  # [BP, BK]
                fk = tl.load(ft_ptr + (f_row + kk)[:, None] * TF + (j - js)[None, :],
                             mask=(kk < d)[:, None] & (j < je)[None, :], other=0.0)  # [BK, BJ]
                diff = yk[:, :, None] - a[:, None, :] * fk[None, :, :]  # [BP, BK, BJ]
                acc += tl.sum(tl.abs(yk)[:, :, None] - tl.abs(diff), axis=1)
            val = tl.where(full, acc, val)
        val = tl.where(pos, tl.maximum(val, 0.0), 0.0)
    tl.store(prox_ptr + flat, val, mask=(r < C)[:, None] & (j < je)[None, :])


@triton.jit(do_not_specialize=["cap", "C", "J", "js", "TF", "s_pg", "s_ph", "s_pr", "s_sg"])
def prox_list(list_ptr, count_ptr, cap, prox_ptr, probs_ptr, scale_ptr, fmax_ptr, ft_ptr, sy_ptr, sidx_ptr,
              sabs_ptr, H, C, J, d, js, TF, n_prog,
              s_pg, s_ph, s_pr, s_pj, s_sg, s_sr,
              PB: tl.constexpr, WQ: tl.constexpr, HAS_SCALE: tl.constexpr):
    """Finish the listed sub-edges (``prox`` holds their ``lin``): each sums the correction over its own
    candidate coordinates, ``WQ`` at a time, until the next smallest ``|y_p|`` reaches its threshold.
    ``n_prog`` programs share the list (persistent loop; no host sync to learn its length)."""
    count = tl.minimum(tl.load(count_ptr), cap)
    for base in range(tl.program_id(0) * PB, count, n_prog * PB):
        i = base + tl.arange(0, PB)
        live = i < count
        flat = tl.load(list_ptr + i, mask=live, other=0)
        j = flat % J
        rest = flat // J
        r = rest % C
        gh = rest // C
        h = gh % H
        g = gh // H
        lin = tl.load(prox_ptr + flat, mask=live, other=0.0)
        a = tl.load(probs_ptr + g * s_pg + h * s_ph + r * s_pr + j * s_pj, mask=live, other=0.0).to(tl.float32)
        if HAS_SCALE:
            a = a * tl.load(scale_ptr + g * s_sg + r * s_sr, mask=live, other=0.0)
        thr = a * tl.load(fmax_ptr + gh * TF + (j - js), mask=live, other=0.0)
        d_row = (g * C + r) * d
        f_row = gh * d
        over = tl.zeros((PB,), dtype=tl.float32)
        active = live
        q0 = 0
        while tl.max(active.to(tl.int32)) > 0:
            q = q0 + tl.arange(0, WQ)
            qa = active[:, None] & (q < d)[None, :]
            sab = tl.load(sabs_ptr + d_row[:, None] + q[None, :], mask=qa, other=float("inf"))
            inq = qa & (sab < thr[:, None])
            yq = tl.load(sy_ptr + d_row[:, None] + q[None, :], mask=inq, other=0.0)
            kq = tl.load(sidx_ptr + d_row[:, None] + q[None, :], mask=inq, other=0)
            fq = tl.load(ft_ptr + (f_row[:, None] + kq) * TF + (j - js)[:, None], mask=inq, other=0.0)
            term = a[:, None] * tl.where(yq < 0, -1.0, 1.0) * fq - sab
            over += tl.sum(tl.where(inq, tl.maximum(term, 0.0), 0.0), axis=1)
            q0 += WQ
            nxt = tl.load(sabs_ptr + d_row + q0, mask=active & (i * 0 + q0 < d), other=float("inf"))
            active = active & (nxt < thr)
        tl.store(prox_ptr + flat, tl.maximum(lin - 2.0 * over, 0.0), mask=live)


@triton.jit
def _direct_prox(y_ptr, y_row, z_ptr, z_off, s_zd, ok, d, BR: tl.constexpr, BD: tl.constexpr, DIFF: tl.constexpr):
    """``relu(sum_k |y_k| - |y_k - z_k|)`` per row; rows at ``y_row`` (float32, contiguous) and ``z_off``
    (stride ``s_zd`` between coordinates). DIFF: the part is ``y - z`` instead of ``z``."""
    acc = tl.zeros((BR,), dtype=tl.float32)
    for k0 in range(0, d, BD):
        kk = k0 + tl.arange(0, BD)
        msk = ok[:, None] & (kk < d)[None, :]
        yv = tl.load(y_ptr + y_row[:, None] + kk[None, :], mask=msk, other=0.0)
        z = tl.load(z_ptr + z_off[:, None] + kk[None, :] * s_zd, mask=msk, other=0.0).to(tl.float32)
        if DIFF:
            z = yv - z
        acc += tl.sum(tl.abs(yv) - tl.abs(yv - z), axis=1)
    return tl.maximum(acc, 0.0)


@triton.jit(do_not_specialize=["N"])
def direct_rows(y_ptr, z_ptr, out_ptr, N, d, s_zn, s_zd, s_ok, s_on,
                BR: tl.constexpr, BD: tl.constexpr):
    """Nodes ``y`` ``[N, d]`` (float32, contiguous) made of two parts, ``z`` and ``y - z`` (``z`` ``[N, d]``
    strided): their importances ``out[0, n]`` and ``out[1, n]`` (0 and 0 when both proximities are 0)."""
    n = tl.program_id(0) * BR + tl.arange(0, BR)
    ok = n < N
    y_row = n.to(tl.int64) * d
    z_off = n.to(tl.int64) * s_zn
    first = _direct_prox(y_ptr, y_row, z_ptr, z_off, s_zd, ok, d, BR, BD, False)
    second = _direct_prox(y_ptr, y_row, z_ptr, z_off, s_zd, ok, d, BR, BD, True)
    total = first + second
    scale = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
    tl.store(out_ptr + n * s_on, first * scale, mask=ok)
    tl.store(out_ptr + s_ok + n * s_on, second * scale, mask=ok)


@triton.jit(do_not_specialize=["C", "J", "p0", "tau", "M", "s_z0g", "s_z1g", "s_wg", "s_dk", "s_dg", "s_og", "s_oh",
                               "s_sg", "s_hg", "s_hr", "s_ng", "s_nr"])
def finish_rows(prox_ptr, y_ptr, z0_ptr, z1_ptr, start_ptr, len_ptr, wi_ptr, src_ptr, query_ptr,
                direct_ptr, hs_ptr, prev_ptr, same_ptr, srco_ptr, hit_h_ptr, hit_j_ptr, hit_v_ptr, hit_n_ptr,
                H, C, J, d, p0, tau, M,
                s_z0g, s_z0r, s_z0d, s_z1g, s_z1r, s_z1d, s_wg, s_dk, s_dg, s_dr,
                s_og, s_oh, s_or, s_sg, s_hg, s_hr, s_ng, s_nr,
                K: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr, WORDS: tl.constexpr,
                SOURCE: tl.constexpr, HITS: tl.constexpr, SCALE_SUB: tl.constexpr):
    """Finish ``BR`` rows of one sequence ``g``: direct parts ``z0`` (and ``z1`` when K = 2) against ``y``,
    node totals with the sub-edges' proximities ``prox`` ``[G, H, C, J]``, then every part divided by its
    node's total and reduced in one pass: ``direct[k, g, r]``; ``hs/prev/same[g, h, r]`` (each head's row
    sum, its importance on ``p - 1``, on earlier subwords of ``p``'s word); ``srco[g, h]`` (over the source
    positions, at the query row); the sub-edges above ``tau`` into slots ``[g, r, :M]`` in (head, source)
    order with their count in ``hit_n[g, r]``; with SCALE_SUB the importances replace ``prox``."""
    g = tl.program_id(1)
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    p = p0 + r
    start = tl.load(start_ptr + g)
    length = tl.load(len_ptr + g)
    row_ok = (r < C) & (p >= start) & (p < start + length)
    m = (g * C + r).to(tl.int64)
    total = _direct_prox(y_ptr, m * d, z0_ptr, g * s_z0g + r * s_z0r, s_z0d, row_ok, d, BR, BD, False)
    d0 = total
    d1 = total * 0.0
    if K == 2:
        d1 = _direct_prox(y_ptr, m * d, z1_ptr, g * s_z1g + r * s_z1r, s_z1d, row_ok, d, BR, BD, False)
        total = total + d1
    j_end = tl.minimum(J, p0 + tl.program_id(0) * BR + BR)  # causal: no row here reads a source beyond
    for h in range(0, H):
        row = ((g * H + h) * C + r).to(tl.int64) * J
        for j0 in range(0, j_end, BJ):
            jj = j0 + tl.arange(0, BJ)
            tile = tl.load(prox_ptr + row[:, None] + jj[None, :], mask=row_ok[:, None] & (jj[None, :] <= p[:, None]),
                           other=0.0)
            total += tl.sum(tile, axis=1)
    scale = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
    tl.store(direct_ptr + g * s_dg + r * s_dr, d0 * scale, mask=row_ok)
    if K == 2:
        tl.store(direct_ptr + s_dk + g * s_dg + r * s_dr, d1 * scale, mask=row_ok)
    wp = r * 0 - 1
    if WORDS:
        wp = tl.load(wi_ptr + g * s_wg + p, mask=row_ok, other=-1)
    query = -1
    if SOURCE:
        query = tl.load(query_ptr + g)
    count = tl.zeros((BR,), dtype=tl.int32)
    node = g * s_hg + r * s_hr  # [BR] slot rows of the hits
    for h in range(0, H):
        row = ((g * H + h) * C + r).to(tl.int64) * J
        hs = tl.zeros((BR,), dtype=tl.float32)
        prev = tl.zeros((BR,), dtype=tl.float32)
        same = tl.zeros((BR,), dtype=tl.float32)
        src = tl.zeros((BR,), dtype=tl.float32)
        for j0 in range(0, j_end, BJ):
            jj = j0 + tl.arange(0, BJ)
            ok = row_ok[:, None] & (jj[None, :] <= p[:, None]) & (jj[None, :] >= start)
            imp = tl.load(prox_ptr + row[:, None] + jj[None, :], mask=ok, other=0.0) * scale[:, None]
            if SCALE_SUB:
                tl.store(prox_ptr + row[:, None] + jj[None, :], imp, mask=(r < C)[:, None] & (jj < J)[None, :])
            hs += tl.sum(imp, axis=1)
            prev += tl.sum(tl.where(jj[None, :] == p[:, None] - 1, imp, 0.0), axis=1)
            if WORDS:
                wj = tl.load(wi_ptr + g * s_wg + jj, mask=jj < J, other=-2)
                hit_word = (wj[None, :] == wp[:, None]) & (wp[:, None] >= 0) & (jj[None, :] < p[:, None])
                same += tl.sum(tl.where(hit_word, imp, 0.0), axis=1)
            if SOURCE:
                sj = tl.load(src_ptr + g * s_wg + jj, mask=jj < J, other=0)
                src += tl.sum(tl.where(sj[None, :] > 0, imp, 0.0), axis=1)
            if HITS:
                keep = ok & (imp > tau)
                k32 = keep.to(tl.int32)
                slot = count[:, None] + tl.cumsum(k32, axis=1) - 1
                at = node[:, None] + slot
                tl.store(hit_h_ptr + at, h + 0 * slot, mask=keep & (slot < M))
                tl.store(hit_j_ptr + at, jj[None, :] + 0 * slot, mask=keep & (slot < M))
                tl.store(hit_v_ptr + at, imp, mask=keep & (slot < M))
                count += tl.sum(k32, axis=1)
        out = g * s_og + h * s_oh + r * s_or
        tl.store(hs_ptr + out, hs, mask=row_ok)
        tl.store(prev_ptr + out, prev, mask=row_ok)
        if WORDS:
            tl.store(same_ptr + out, same, mask=row_ok)
        if SOURCE:
            here = row_ok & (p == query)
            tl.store(srco_ptr + g * s_sg + h + 0 * r, src, mask=here)
    if HITS:
        tl.store(hit_n_ptr + g * s_ng + r * s_nr, count, mask=row_ok)
