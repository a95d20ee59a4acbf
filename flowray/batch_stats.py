"""The job path's running reductions for a padded batch, on the model's device, filled layer by layer.

``BatchState`` holds, for every layer and padded position, what ``flowray.stats`` reports per prediction
(each head's summed importance, its importance on the previous token and on earlier subwords of the same
word, the direct parts' importances, the sub-edges above the smallest tau in per-node slots);
``add_layer`` feeds it one layer's captured activations through a kernel's ``block``. Nothing here waits
for the device: the host reads the results once, after the forward pass (``graphs`` and the finish).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from flowray.capture import LayerActivations
from flowray.errors import InputError
from flowray.kernels import Block, BlockOut, HitSlots, Kernel
from flowray.sparse_routes import Graph, KeyRows


class Hits(NamedTuple):
    """``N`` sub-edges above the smallest tau: each one's layer, sequence, padded position, head, source
    position (padded) and importance, ``[N]`` each."""

    layer: torch.Tensor
    seq: torch.Tensor
    pos: torch.Tensor
    head: torch.Tensor
    source: torch.Tensor
    value: torch.Tensor


class BatchState:
    """Device-resident statistics of ``B`` sequences on a grid of ``T`` padded positions.

    ``spans[b] = (start, length)``: sequence ``b``'s real positions. ``words[b]``: None or
    ``(word_index, first_subword)`` (each ``[T_b]``); ``sources[b]``: None or ``(query, positions)``.
    """

    def __init__(self, L: int, H: int, spans: list, T: int, parallel: bool, tau_min: float, device,
                 words: list | None, sources: list | None, slots: int | None):
        B = len(spans)
        self.L, self.H, self.B, self.T, self.spans, self.parallel, self.tau_min = L, H, B, T, spans, parallel, tau_min
        f32 = dict(dtype=torch.float32, device=device)
        self.head_sum = torch.zeros(L, B, H, T, **f32)  # sum_j e^h_{pos,j}
        self.direct = torch.zeros(L, 2, B, T, **f32)  # the attention node's residual (parallel: and FFN)
        self.ffn = torch.zeros(L, B, T, **f32)  # the FFN's importance (parallel: at the attention node)
        self.ffn_residual = None if parallel else torch.zeros(L, B, T, **f32)
        self.prev = torch.zeros(L, B, H, T, **f32) if words is not None else None  # e^h_{pos,pos-1}
        self.same = torch.zeros(L, B, H, T, **f32) if words is not None else None
        self.words = self.first = None
        if words is not None:
            wi = np.full((B, T), -1, dtype=np.int32)
            first = np.zeros((B, T), dtype=bool)
            for b, ((start, n), (word_index, first_subword)) in enumerate(zip(spans, words)):
                w, f = np.asarray(word_index)[:n], np.asarray(first_subword, dtype=bool)[:n]
                if w.shape != (n,) or f.shape != (n,):
                    raise InputError(f"word_index and first_subword must have one entry per token ({n}); got "
                                     f"{w.shape} and {f.shape}")
                wi[b, start : start + n], first[b, start : start + n] = w, f
            self.words = torch.from_numpy(wi).to(device)
            self.first = torch.from_numpy(first).to(device)
        self.source = self.source_mask = self.query = None
        if sources is not None and any(src is not None for src in sources):
            query = np.full(B, -1, dtype=np.int64)
            mask = np.zeros((B, T), dtype=np.int32)
            for b, ((start, n), src) in enumerate(zip(spans, sources)):
                if src is not None:
                    q, positions = check_source(src, n)
                    query[b] = start + q
                    mask[b, start + np.asarray(positions)] = 1
            self.query = torch.from_numpy(query).to(device)
            self.source_mask = torch.from_numpy(mask).to(device)
            self.source = torch.zeros(L, B, H, **f32)
        self.M = slots if slots is not None else math.floor(1 / tau_min) + 1
        i32 = dict(dtype=torch.int32, device=device)
        self.hit_head = torch.zeros(L, B, T, self.M, **i32)
        self.hit_source = torch.zeros(L, B, T, self.M, **i32)
        self.hit_value = torch.zeros(L, B, T, self.M, **f32)
        self.hit_count = torch.zeros(L, B, T, **i32)
        self.offsets = [0] * B  # grid offset of each sequence's block (set by add_layer's plan)

    def targets(self, l: int, first: int, stop: int, off: int, T_grid: int, p0: int, p1: int, K: int) -> BlockOut:
        """``BlockOut`` views for rows ``p0 .. p1 - 1`` of the grid at padded position ``off``."""
        bs, rows, grid = slice(first, stop), slice(off + p0, off + p1), slice(off, off + T_grid)
        query = None
        if self.query is not None:
            query = self.query[bs] - off if off else self.query[bs]
        return BlockOut(
            direct=self.direct[l, :K, bs, rows], head_sum=self.head_sum[l, bs, :, rows],
            prev=None if self.prev is None else self.prev[l, bs, :, rows],
            same=None if self.same is None else self.same[l, bs, :, rows],
            words=None if self.words is None else self.words[bs, grid],
            source=None if self.source is None else self.source[l, bs],
            source_mask=None if self.source_mask is None else self.source_mask[bs, grid], query=query,
            hits=HitSlots(self.hit_head[l, bs, grid], self.hit_source[l, bs, grid], self.hit_value[l, bs, grid],
                          self.hit_count[l, bs, grid]),
            tau=self.tau_min)

    def overflow(self) -> int:
        """The largest count of sub-edges above tau at one node, when it exceeds the slots (else 0)."""
        most = int(self.hit_count.max()) if self.hit_count.numel() else 0
        return most if most > self.M else 0

    def filled(self, above: float | None = None) -> torch.Tensor:
        """``[L, B, T, M]``: the slots that hold a hit (with ``above``: a hit whose value exceeds it)."""
        M = self.M
        valid = torch.arange(M, device=self.hit_count.device) < self.hit_count.clamp_max(M)[..., None]
        return valid if above is None else valid & (self.hit_value > above)

    def hits(self) -> Hits:
        """The filled slots as flat tensors in slot order (layer, sequence, position, slot): one read of the
        device for their number. For the passes after the forward pass, which read only these."""
        l, b, t, m = torch.nonzero(self.filled()).unbind(1)
        offs = torch.tensor(self.offsets, device=l.device)
        source = (self.hit_source[l, b, t, m].long() + offs[b]).clamp(0, self.T - 1)  # grid -> padded positions
        return Hits(l, b, t, self.hit_head[l, b, t, m].long(), source, self.hit_value[l, b, t, m])

    def graphs(self, hits: Hits) -> list[Graph]:
        """Each sequence's ``Graph`` (positions relative to its first real token), from ``self.hits()``."""
        L, B = self.L, self.B
        order = torch.argsort(hits.seq, stable=True)  # sequence-major, (layer, position, slot) within each
        b = hits.seq[order]
        counts = torch.bincount(b, minlength=B).tolist()
        starts = torch.tensor([s for s, _ in self.spans], device=b.device)[b]
        value = hits.value[order]
        hit = torch.stack([hits.layer[order], hits.head[order], hits.pos[order] - starts, hits.source[order] - starts],
                          dim=1)  # [N, 4] (layer, head, pos, j)
        out = []
        for bi, (hit_b, value_b) in enumerate(zip(hit.split(counts), value.split(counts))):
            start, n = self.spans[bi]
            rows = slice(start, start + n)
            out.append(Graph(L, self.H, n, self.parallel, hit_b, value_b, self.direct[:, 0, bi, rows],
                             self.ffn[:, bi, rows], None if self.parallel else self.ffn_residual[:, bi, rows]))
        return out


def span_tensors(spans: list, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's start and length as int32 device tensors, for whole-batch kernels; made once per
    batch (a host-to-device copy per layer would wait for the device)."""
    both = torch.tensor([[start for start, _ in spans], [n for _, n in spans]], dtype=torch.int32)
    return tuple(both.to(device))


class LayerRows:
    """Layer ``rec.layer`` for batch rows ``first .. stop - 1`` on a grid of ``T_grid`` padded positions from
    ``off`` (``block``): the attention node ``y`` with its direct parts, the head outputs, and each sequence's
    real positions on the grid (``starts``, ``lengths``)."""

    def __init__(self, kernel: Kernel, rec: LayerActivations, block: tuple[int, int, int, int], spans: list,
                 w_o: torch.Tensor, w_flat: torch.Tensor, parallel: bool):
        self.kernel, self.rec = kernel, rec
        self.first, self.stop, self.off, self.T_grid = first, stop, off, T_grid = block
        bs, rows = slice(first, stop), slice(off, off + T_grid)
        x, attn_out, self.out = rec.inputs[bs, rows], rec.attn_out[bs, rows], rec.outputs[bs, rows]
        self.heads = kernel.head_outputs(rec.values[bs, :, rows], w_o, w_flat)
        if parallel:
            self.y = self.out.float()  # x^l = x + attn + ffn: one node, parts residual and FFN
            self.parts = [x, self.y - x.float() - attn_out.float()]
        else:
            self.y = x.float() + attn_out.float()  # x^{lA}
            self.parts = [x]
        self.starts = [spans[b][0] - off for b in range(first, stop)]
        self.lengths = [spans[b][1] for b in range(first, stop)]

    def blocks(self, C: int, span_tensors=None):
        """``(p0, p1, Block)`` for the grid's query rows in chunks of ``C``."""
        first, stop, off, rec = self.first, self.stop, self.off, self.rec
        for p0 in range(0, self.T_grid, C):
            p1 = min(self.T_grid, p0 + C)
            scale = None if rec.row_scale is None else rec.row_scale[first:stop, off + p0 : off + p1]
            yield p0, p1, Block(y=self.y[:, p0:p1], parts=[z[:, p0:p1] for z in self.parts],
                                probs=rec.block_rows(first, stop, off, p0, p1), row_scale=scale, heads=self.heads,
                                p0=p0, starts=self.starts, lengths=self.lengths, span_tensors=span_tensors)

    def block_node(self) -> torch.Tensor:
        """``[2, G, T_grid]``: the FFN's block node ``x^l = x^{lA} + FFN``, its residual and FFN parts."""
        G, d = self.stop - self.first, self.y.shape[-1]
        return self.kernel.block_node(self.out.reshape(G * self.T_grid, d),
                                      self.y.reshape(G * self.T_grid, d)).view(2, G, self.T_grid)


def add_layer(kernel: Kernel, state: BatchState, rec: LayerActivations, block: tuple[int, int, int, int],
              w_o: torch.Tensor, w_flat: torch.Tensor, budget: int, span_tensors=None) -> None:
    """Fold layer ``rec.layer`` of batch rows ``first .. stop - 1`` (a grid of ``T_grid`` padded positions
    from ``off``) into ``state``, in blocks of query rows within ``budget`` elements ``[G, H, C, T_grid]``."""
    first, stop, off, T_grid = block
    l = rec.layer
    for b in range(first, stop):
        state.offsets[b] = off
    bs, rows = slice(first, stop), slice(off, off + T_grid)
    layer = LayerRows(kernel, rec, block, state.spans, w_o, w_flat, state.parallel)
    for p0, p1, blk in layer.blocks(kernel.rows_per_block(stop - first, state.H, T_grid, budget), span_tensors):
        kernel.block(blk, state.targets(l, first, stop, off, T_grid, p0, p1, len(layer.parts)))
    if state.parallel:
        state.ffn[l, bs, rows] = state.direct[l, 1, bs, rows]
    else:  # x^l = x^{lA} + FFN: a node of two direct parts
        state.ffn_residual[l, bs, rows], state.ffn[l, bs, rows] = layer.block_node()


def check_source(source, T: int) -> tuple[int, list[int]]:
    """``(query, positions)``: a query position and earlier (or equal) source positions of one sequence."""
    try:
        query, positions = source
        query = int(query)
        positions = [int(j) for j in positions]
    except (TypeError, ValueError):
        raise InputError(f"a source must be a (query, positions) pair of ints; got {source!r}") from None
    if not 0 <= query < T or not positions or any(not 0 <= j <= query for j in positions):
        raise InputError(f"a source needs a query position in [0, {T}) and one or more source positions in "
                         f"[0, query]; got query {query}, positions {positions}")
    return query, positions


# Every position's routes for the whole batch at once while the edge matrices of one tau, ``[L, B, T + H, T]``,
# fit in this many bytes; several taus go side by side while they fit together
BATCHED_ROUTES_BYTES = 3 << 29  # 1.5 GiB: 3 taus of SmolLM2 at 32 x 512 tokens in half precision


def _route_dtype(device) -> torch.dtype:
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def _route_bytes(state: BatchState) -> int:
    size = torch.finfo(_route_dtype(state.hit_head.device)).bits // 8
    return state.L * state.B * (state.T + state.H + 2) * state.T * size


def batched_routes_fit(state: BatchState) -> bool:
    return _route_bytes(state) <= BATCHED_ROUTES_BYTES


def routes_all(state: BatchState, taus, hits: Hits) -> dict[float, tuple[list[KeyRows], list[KeyRows]]]:
    """Every position's route at each tau for every sequence of the batch, read from the slots.

    The same rules as ``sparse_routes.routes_of`` (appendix B.2), with the sequences and the taus side by
    side on the padded grid (as many taus at once as ``BATCHED_ROUTES_BYTES`` allows). Returns, per tau,
    flat (keys ``p * L*H + flat head``, ``p * L + layer``) per sequence, positions relative. ``hits``:
    ``state.hits()``.
    """
    out: dict = {}
    group = max(1, BATCHED_ROUTES_BYTES // _route_bytes(state))
    taus = list(taus)
    for i in range(0, len(taus), group):
        out.update(_routes_group(state, taus[i : i + group], hits))
    return out


def _routes_group(state: BatchState, taus: list, hits: Hits) -> dict[float, tuple[list[KeyRows], list[KeyRows]]]:
    """``routes_all`` for ``K`` taus at once: three device operations per layer for all of them.

    One matrix per layer, tau and sequence, ``A [1 + H + T, T]`` over the positions ``pos`` of its nodes:
    row 0 the FFN edge kept at ``pos``, rows ``1 + h`` a kept sub-edge of head ``h``, rows ``1 + H + j`` a
    kept part from position ``j`` (the diagonal: the residual, or a parallel block's FFN); columns of nodes
    that pass on nothing below (``through``) are zero in all but row 0. Reached sets ``[K B, T, P]`` move down
    one block per layer as ``A reached`` (a batched matrix product; 0/1 entries, exact in half precision
    with float32 accumulation, any positive count clamped to 1).
    """
    L, B, T, _ = state.hit_head.shape
    H, K, dev = state.H, len(taus), state.hit_head.device
    R = 1 + H + T  # rows in use; row R takes the hits not kept and is never read
    dt = _route_dtype(dev)
    hl, hb, hp = hits.layer, hits.seq, hits.pos
    src_row, head_row = 1 + H + hits.source, 1 + hits.head
    one = torch.ones((), dtype=dt, device=dev).expand(len(hl))
    res, ffn = state.direct[:, 0], state.ffn  # [L, B, T]
    A = torch.zeros(L, K, B, R + 1, T, dtype=dt, device=dev)
    for k, tau in enumerate(taus):
        keep = hits.value > tau
        self_keep = (res > tau) | (ffn > tau) if state.parallel else res > tau  # [L, B, T]
        if not state.parallel:  # x^{lA} is reached only through the FFN's block node's kept parts
            through = (ffn > tau) | (state.ffn_residual > tau)
            keep &= through[hl, hb, hp]
            self_keep &= through
        a = A[:, k]  # every write is a 1 (duplicates agree, so no accumulation)
        a.index_put_((hl, hb, torch.where(keep, src_row, R), hp), one)
        a.index_put_((hl, hb, torch.where(keep, head_row, R), hp), one)
        diag = a[:, :, 1 + H : R].diagonal(dim1=2, dim2=3)
        diag.copy_(torch.maximum(diag, self_keep.to(dt)))
        a[:, :, 0] = (ffn > tau).to(dt)
    A = A.view(L, K * B, R + 1, T)[:, :, :R]
    real = torch.zeros(B, T, dtype=dt, device=dev)
    for b, (start, n) in enumerate(state.spans):
        real[b, start : start + n] = 1
    reached = torch.diag_embed(real).repeat(K, 1, 1)  # [K B, T, P]: prediction P reaches position T atop
    on = torch.empty(L, K * B, 1 + H, T, dtype=torch.bool, device=dev)  # FFN, then heads, per prediction P
    prods = torch.empty(2, K * B, R, T, dtype=dt, device=dev)  # by turns: a product never writes its input
    for l in range(L - 1, -1, -1):
        prod = torch.bmm(A[l], reached, out=prods[l % 2])
        torch.gt(prod[:, : 1 + H], 0, out=on[l])
        reached = prod[:, 1 + H :].clamp_max_(1)  # [K B, T, P]
    out = {}
    for k, tau in enumerate(taus):
        part = on[:, k * B : (k + 1) * B]  # [L, B, 1 + H, P]
        out[tau] = (_split(part[:, :, 1:].permute(1, 3, 0, 2), state.spans, L * H),
                    _split(part[:, :, 0].permute(1, 2, 0), state.spans, L))
    return out


def _split(on: torch.Tensor, spans: list, width: int) -> list[KeyRows]:
    """``[B, P, ...]`` booleans -> per sequence, per real position ``p``, the ascending flat indices set
    (``KeyRows``: one array and its row offsets, not an array per position)."""
    B, P = on.shape[:2]
    flat = on.reshape(B, P, width)
    idx = torch.nonzero(flat)  # [N, 3] (b, p, value), sorted; the host waits for its size
    counts = torch.bincount(idx[:, 0] * P + idx[:, 1], minlength=B * P)
    both = torch.cat([counts, idx[:, 2]]).cpu().numpy().astype(np.int64, copy=False)  # one copy, one wait
    counts, values = both[: B * P].reshape(B, P), both[B * P :]
    out, at = [], 0
    for b, (start, n) in enumerate(spans):
        c = counts[b]
        before = int(c[:start].sum())
        offsets = np.concatenate([[0], np.cumsum(c[start : start + n])]).astype(np.int64)  # [n + 1]
        out.append(KeyRows.from_offsets(values[at + before : at + before + int(offsets[-1])], offsets))
        at += int(c.sum())
    return out


def pruned_all(state: BatchState, tau: float, active_above: float, hits: Hits) -> list[KeyRows]:
    """Per sequence and position, the flat heads whose importance at the position's own attention node, after
    every part <= tau is dropped and the kept parts are rescaled to sum to 1, exceeds ``active_above``.
    ``hits``: ``state.hits()``."""
    L, B, T, _ = state.hit_head.shape
    kept_heads = torch.zeros(L, B, state.H, T, dtype=torch.float32, device=state.hit_head.device)
    kept = torch.where(hits.value > tau, hits.value, 0.0)
    kept_heads.index_put_((hits.layer, hits.seq, hits.head, hits.pos), kept, accumulate=True)
    res = state.direct[:, 0]
    node = kept_heads.sum(2) + res * (res > tau)  # [L, B, T] the node's kept parts
    if state.parallel:  # the FFN is a part of the same node
        node = node + state.ffn * (state.ffn > tau)
    pruned = kept_heads / torch.where(node > 0, node, 1.0)[:, :, None, :]
    return _split((pruned > active_above).permute(1, 3, 0, 2), state.spans, L * state.H)
