"""The Triton backend: a handful of launches per layer for the whole padded batch, no host synchronisation.

Per block (``G`` sequences' rows ``p0 .. p0 + C - 1`` on a padded grid, sources ``j < J``), in stream order:

1. ``sign_gemm``: ``Gs = sign(y) W_O^T``, in the model's half precision where it has one (exact products);
2. ``torch.sort`` of each row's ``|y|`` (the order in which coordinates can overshoot);
3. ``head_outputs_t``: ``F^T`` and ``f_max`` of the sources (once per layer when they fit
   ``KernelConfig.f_budget``, else per window of sources);
4. ``prox_tiles`` then ``prox_list`` (twice: the sub-edges with up to ``list_coords`` candidates in one
   step, the rest in several): every sub-edge's proximity, each in its cheapest exact case;
5. ``finish_rows``: node totals, normalisation and every per-row reduction the job needs, the sub-edges
   above the smallest tau into per-node slots (deterministic order).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the tests), where it computes in
float32 throughout (the interpreter has no half-precision dot).
"""

from __future__ import annotations

import os

import torch
import triton

from flowray.errors import InputError
from flowray.kernels import triton_jit as jit
from flowray.kernels.base import Block, BlockOut, HeadOutputs, Kernel, check_heads, flat_output_projection

HALF = (torch.float16, torch.bfloat16)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(int(n)))


class TritonKernel(Kernel):
    name = "triton"
    whole_batch = True

    def __init__(self, config=None):
        super().__init__(config)
        small = interpreted()  # the interpreter runs one program at a time: small tiles, few programs
        tile, head = self.config.triton_tile, self.config.triton_head_block
        for n in (*(tile or ()), *([head] if head else [])):
            if n < 16 or n & (n - 1):
                raise InputError(f"Triton tiles must be powers of two of at least 16; got tile {tile}, "
                                 f"head block {head}")
        self.tile = tile or ((32, 32) if small else (16, 64))  # BP, BJ of prox_tiles (16 rows: no spills)
        self.head_block = head or 64  # sources per head_outputs_t program, half precision
        self.gemm = (16, 16, 16) if small else (128, 128, 32)
        self.n_prog = 2 if small else 4 * _sm_count()

    # --- the interface --------------------------------------------------------------------------------
    def plan(self, spans, H, budget):
        return [(0, len(spans), 0, max(start + T for start, T in spans))]

    def head_outputs(self, values, w_o, w_flat=None) -> HeadOutputs:
        check_heads(w_o.shape[0], values.shape[-3])
        if values.dim() == 3:
            values = values[None]
        w_o = w_o.detach()
        if w_o.dtype not in HALF or w_o.dtype != values.dtype:  # tensor cores only on matching half types
            w_o, values = w_o.float(), values.float()
        w_flat = flat_output_projection(w_o) if w_flat is None else w_flat.to(w_o.dtype)
        G, H, T, d = values.shape[0], w_o.shape[0], values.shape[2], w_o.shape[2]
        F = f_max = None
        if G * H * T * d <= self.config.f_budget:
            F, f_max = self._head_outputs_t(values, w_flat, H, 0, T)
        return HeadOutputs(values=values, w_o=w_o, w_flat=w_flat, F=F, f_max=f_max)

    def sub_edge_block(self, y, probs, heads: HeadOutputs, p0: int = 0, *, out=None) -> torch.Tensor:
        G, H, C, J = probs.shape
        blk = Block(y=y, parts=[], probs=probs, row_scale=None, heads=heads, p0=p0, starts=[0] * G,
                    lengths=[p0 + C] * G)
        return self._proximities(blk, out)

    def finish_block(self, sub, y, parts, p0: int = 0) -> torch.Tensor:
        G, C = y.shape[:2]
        if sub is None:  # nodes of direct parts only: the block node's kernel takes two parts
            sub = torch.zeros(G, 0, C, C, dtype=torch.float32, device=y.device)
        blk = Block(y=y, parts=parts, probs=sub, row_scale=None, heads=None, p0=p0, starts=[0] * G,
                    lengths=[p0 + C] * G)
        out = BlockOut(direct=torch.empty(len(parts), G, C, dtype=torch.float32, device=y.device), sub=sub)
        self._finish(sub, blk, out, scale_sub=True)
        return out.direct

    def block_node(self, out_rows, mid):
        y = out_rows.float().contiguous()
        N, d = y.shape
        z = mid
        out = torch.empty(2, N, dtype=torch.float32, device=y.device)
        BR = 16
        jit.direct_rows[(triton.cdiv(N, BR),)](y, z, out, N, d, z.stride(0), z.stride(1), out.stride(0),
                                               out.stride(1), BR=BR, BD=min(128, _pow2(d)))
        return out

    def block(self, blk: Block, out: BlockOut) -> None:
        prox = self._proximities(blk, None)
        self._finish(prox, blk, out, scale_sub=out.sub is not None)
        if out.sub is not None and out.sub is not prox:
            out.sub.copy_(prox)

    # --- the launches ---------------------------------------------------------------------------------
    def _head_outputs_t(self, values, w_flat, H: int, t0: int, TF: int):
        G, _, T, dh = values.shape
        d = w_flat.shape[0]
        ft = torch.empty(G, H, d, TF, dtype=torch.float32, device=values.device)
        fmax = torch.empty(G, H, TF, dtype=torch.float32, device=values.device)
        exact = self._exact(values, w_flat)
        BT = 32 if exact else self.head_block  # float32 products hold more registers
        jit.head_outputs_t[(triton.cdiv(TF, BT), H, G)](
            values, w_flat, ft, fmax, H, d, dh, H // values.shape[1], t0, TF, T, *values.stride(),
            *w_flat.stride(), BT=BT, BK=BT, DH=_pow2(dh), STORE=True, EXACT=exact)
        return ft, fmax

    def _exact(self, *tensors) -> bool:
        return interpreted() or any(t.dtype not in HALF for t in tensors)

    def _proximities(self, blk: Block, out) -> torch.Tensor:
        """``prox`` ``[G, H, C, J]`` of a block (steps 1-4)."""
        G, H, C, J = blk.shape
        heads = blk.heads
        values, w_flat = heads.values, heads.w_flat
        dh, d = values.shape[-1], w_flat.shape[0]
        y = blk.y.float().reshape(G * C, d).contiguous()
        gs = torch.empty(G * C, H * dh, dtype=torch.float32, device=y.device)
        exact = self._exact(w_flat)
        BM, BN, BK = self.gemm if not exact or interpreted() else (64, 64, 16)
        jit.sign_gemm[(triton.cdiv(G * C, BM), triton.cdiv(H * dh, BN))](
            y, w_flat, gs, G * C, H * dh, d, y.stride(0), *w_flat.stride(), gs.stride(0),
            BM=BM, BN=BN, BK=BK, EXACT=exact, num_warps=8 if BM >= 128 else 4)
        sabs, sidx = torch.sort(y.abs(), dim=-1)  # [G * C, d] ascending |y| per row, and where
        sy = torch.gather(y, 1, sidx)  # y at those coordinates (its sign)
        prox = out if out is not None else torch.empty(G, H, C, J, dtype=torch.float32, device=y.device)
        starts, lengths = _spans(blk, y.device)
        probs, scale = blk.probs, blk.row_scale
        split = values.dtype == torch.bfloat16 and not interpreted()  # s . F on bfloat16 tensor cores
        BP, BJ = self.tile if split or interpreted() else (32, 32)  # float32 FMAs need smaller tiles
        W1, W2 = self.config.tile_coords, max(self.config.list_coords, self.config.tile_coords)
        pairs = G * H * C * J
        share = self.config.list_share
        cap_mid, cap_big = 1 + pairs // share, 1 + pairs // (4 * share)
        lists = torch.empty(cap_mid + cap_big, dtype=torch.int64, device=y.device)
        mid, big = lists[:cap_mid], lists[cap_mid:]
        counts = torch.empty(2, dtype=torch.int32, device=y.device)
        window = J if heads.F is not None else max(BJ, self.config.f_budget // max(1, G * H * d) // BJ * BJ)
        group = H // values.shape[1]
        sc = scale if scale is not None else y
        sc_strides = (scale.stride(0), scale.stride(1)) if scale is not None else (0, 0)
        for js in range(0, J, window):
            je = min(J, js + window)
            if heads.F is not None:  # one window: every source (js = 0)
                ft, fmax, TF = heads.F, heads.f_max, heads.F.shape[-1]
            else:  # F of this window's sources only, indexed from js
                ft, fmax = self._head_outputs_t(values, w_flat, H, js, je - js)
                TF = je - js
            counts.zero_()
            n_jbw = triton.cdiv(je - js, BJ)
            jit.prox_tiles[(triton.cdiv(C, BP) * n_jbw, H, G)](
                gs, values, probs, sc, fmax, ft, y, sy, sidx, sabs, starts, lengths,
                prox, counts, mid, big, H, C, J, d, dh, group, blk.p0, js, je, TF, n_jbw, cap_mid, cap_big,
                gs.stride(0), *values.stride(), *probs.stride(), *sc_strides,
                W1=W1, W1P=_pow2(W1, 1), W2=W2, BP=BP, BJ=BJ, DH=_pow2(dh), EC=min(32, _pow2(dh)), BK=4,
                HAS_SCALE=scale is not None, SPLIT=split, num_warps=4)
            for k, (lst, cap, width) in enumerate(((mid, cap_mid, 32), (big, cap_big, 128))):
                jit.prox_list[(self.n_prog,)](
                    lst, counts[k:], cap, prox, probs, sc, fmax, ft, sy, sidx, sabs, H, C, J, d, js,
                    TF, self.n_prog, *probs.stride(), *sc_strides,
                    PB=32 if width <= 32 else 8, WQ=width, HAS_SCALE=scale is not None)
        return prox

    def _finish(self, prox, blk: Block, out: BlockOut, *, scale_sub: bool) -> None:
        G, H, C, J = prox.shape
        y = blk.y.float().reshape(G * C, -1).contiguous()
        d = y.shape[1]
        K = len(blk.parts)
        if K not in (1, 2):
            raise InputError(f"the Triton kernel finishes nodes of 1 or 2 direct parts; got {K}")
        z0, z1 = blk.parts[0], blk.parts[-1]
        starts, lengths = _spans(blk, y.device)
        dev = y.device
        hs = out.head_sum if out.head_sum is not None else torch.empty(G, max(H, 1), C, dtype=torch.float32, device=dev)
        # prev and same are written with head_sum's strides: stand-ins must have them too
        spare = torch.empty_strided(hs.shape, hs.stride(), dtype=torch.float32, device=dev)
        prev = out.prev if out.prev is not None else spare
        same = out.same if out.same is not None else spare
        if prev.stride() != hs.stride() or same.stride() != hs.stride():
            raise InputError("head_sum, prev and same must share their strides")
        words = out.words if out.same is not None else lengths.view(G, 1)
        source = out.source is not None
        srcm = out.source_mask if source else lengths.view(G, 1)
        query = out.query if source else lengths
        srco = out.source if source else spare
        hits = out.hits
        if hits is not None:
            hh, hj, hv, hn = (t[:, blk.p0:] for t in (hits.head, hits.source, hits.value, hits.count))
            M = hits.head.shape[-1]
        else:
            hh = hj = torch.empty(1, 1, 1, dtype=torch.int32, device=dev)
            hv, hn, M = spare, torch.empty(1, 1, dtype=torch.int32, device=dev), 1
        BR = 8 if not interpreted() else 32
        jit.finish_rows[(triton.cdiv(C, BR), G)](
            prox, y, z0, z1, starts, lengths, words, srcm, query,
            out.direct, hs, prev, same, srco, hh, hj, hv, hn,
            H, C, J, d, blk.p0, float(out.tau), M,
            *z0.stride(), *z1.stride(), words.stride(0), *out.direct.stride(),
            *hs.stride(), srco.stride(0), hh.stride(0), hh.stride(1), hn.stride(0), hn.stride(1),
            K=K, BR=BR, BJ=32 if interpreted() else 128, BD=min(128, _pow2(d)), WORDS=out.same is not None,
            SOURCE=source, HITS=hits is not None, SCALE_SUB=scale_sub)


def _spans(blk: Block, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's starts and lengths as int32 device tensors (made once per batch by the caller, whose
    ``Block.span_tensors`` avoids a host-to-device copy per layer)."""
    cached = getattr(blk, "span_tensors", None)
    if cached is not None:
        return cached
    both = torch.tensor([blk.starts, blk.lengths], dtype=torch.int32).to(device)
    return both[0], both[1]


def _sm_count() -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 1
