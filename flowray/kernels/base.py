"""The kernel seam: one interface that every importance backend implements, and what it reads and writes.

``flowray.importance`` holds the maths; a ``Kernel`` computes it for one layer's **block**: ``G`` sequences'
query rows ``p0 .. p0 + C - 1`` on a common padded grid, over their sources ``j < J``. Backends are one
file each (``cpu.py``: numba loops; ``torch_kernel.py``: vectorised torch; ``triton_kernel.py``: Triton)
and are chosen once per call by ``flowray.kernels.select_kernel``. The job path (``flowray.stats``) and
the dense API (``flowray.api``) both call ``Kernel.block``; a backend either overrides it (Triton: fused,
the whole padded batch at once) or inherits the composition below from its ``sub_edge_block`` and
``finish_block``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelConfig:
    """Budgets and chunk sizes of every backend (one place, not module globals).

    element_budget: elements of one block's ``[G, H, C, J]`` importances; sets the rows ``C`` per block
        (None: ``cpu_budget`` on CPUs, where a block should stay in cache, ``gpu_budget`` on GPUs, where fewer
        and larger kernels win).
    chunk_size: query rows per block (None: as many as ``element_budget`` allows).
    dense_rank: the torch backend's switch to a direct ``O(d)`` distance (a speed knob only).
    few: the CPU loop's number of smallest ``|y|`` coordinates kept per row.
    tile_coords / list_coords: Triton: sub-edges with up to ``tile_coords`` candidate coordinates are
        finished inside their tile; up to ``list_coords`` in one step of the list pass; more in several.
    f_budget: Triton: elements of head outputs ``F`` held at once; above it sources go in windows.
    list_share: Triton: list capacity as a share of a block's sub-edges; a full list is no error (its tile
        computes the rest itself, over all coordinates), only slower.
    hits_per_node: slots per node for the sub-edges above the smallest tau (None: ``floor(1 / tau) + 1``,
        an upper bound since a node's importances sum to 1; an overflow is detected and redone).
    triton_tile / triton_head_block: Triton, half-precision models: the ``(rows, sources)`` of a
        ``prox_tiles`` program and the sources of a ``head_outputs_t`` program (None: 16 x 64 and 64 on a GPU,
        small ones under the interpreter); powers of two. ``bench/triton_compile.py`` shows what each
        costs in registers and occupancy, ``bench/gpu_job.py --tiles`` what it costs in time.
    """

    element_budget: int | None = None
    chunk_size: int | None = None
    dense_rank: int = 64  # measured on SmolLM2 (bench/importance_speed.py): a row beats that many gathers
    few: int = 16  # covers 86% of the corrected sub-edges at 256 tokens on SmolLM2 (bench/kernel_cases.py)
    tile_coords: int = 8  # most corrected sub-edges have fewer candidates (SmolLM2, random 7B: mean ~4)
    list_coords: int = 64
    f_budget: int = 1 << 30  # 4 GiB of float32: a 7B model's F for 8 x 1024 tokens at once
    hits_per_node: int | None = None
    list_share: int = 4  # Triton: the sub-edge lists hold 1/list_share (and 1/(4 list_share)) of a block's pairs
    cpu_budget: int = 1 << 22
    gpu_budget: int = 1 << 28
    triton_tile: tuple[int, int] | None = None
    triton_head_block: int | None = None

    def budget(self, device: torch.device) -> int:
        if self.element_budget is not None:
            return self.element_budget
        return self.cpu_budget if device.type == "cpu" else self.gpu_budget


@dataclass(frozen=True)
class HeadOutputs:
    """One layer's head outputs for ``G`` sequences, computed once and read by every block of rows.

    ``F``'s layout belongs to the kernel that made it (``[G, H, T, d]`` for the CPU and torch backends);
    pass it back to the same kernel only.
    """

    values: torch.Tensor  # [G, H_kv, T, dh], value bias included
    w_o: torch.Tensor  # [H, dh, d]
    w_flat: torch.Tensor  # [d, H * dh]  W_O^T of every head side by side (s W_O^h^T for all h in one GEMM)
    F: torch.Tensor | None  # f^h(x_j) = v_j W_O^h, layout per kernel
    f_max: torch.Tensor | None  # [G, H, T]  max_d |F_hj|: bounds which coordinates a sub-edge can overshoot


@dataclass
class Block:
    """One layer's nodes of ``G`` sequences, rows ``p0 .. p0 + C - 1`` of a grid, sources ``j < J``.

    Sequence ``g`` is real on grid positions ``[starts[g], starts[g] + lengths[g])``; other rows are
    padding (their results are never read) and sources before ``starts[g]`` have weight 0.
    """

    y: torch.Tensor  # [G, C, d] float32: the attention node x^{lA} (x^l for parallel blocks)
    parts: list[torch.Tensor]  # K tensors [G, C, d]: the direct parts (residual; parallel: also the FFN)
    probs: torch.Tensor  # [G, H, C, J] attention weights, any float dtype (a strided view is fine)
    row_scale: torch.Tensor | None  # [G, C] post-attention norms' 1/r_pos (None: 1)
    heads: HeadOutputs
    p0: int
    starts: list[int]
    lengths: list[int]
    span_tensors: tuple[torch.Tensor, torch.Tensor] | None = None  # starts, lengths as int32 device tensors

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.probs.shape)  # G, H, C, J


@dataclass
class HitSlots:
    """The sub-edges above the smallest tau, per node: ``[G, T_grid, M]`` slots of one layer, in (head,
    source) order, and their counts ``[G, T_grid]`` (a count above ``M`` is an overflow: redo)."""

    head: torch.Tensor  # int32
    source: torch.Tensor  # int32, grid positions
    value: torch.Tensor  # float32
    count: torch.Tensor  # int32


@dataclass
class BlockOut:
    """Where ``Kernel.block`` writes; every tensor is indexed by grid rows ``p0 .. p0 + C - 1`` (a view).

    sub: ``[G, H, C, J]`` float32 to receive the normalised sub-edge importances (the dense API), or None.
    direct: ``[K, G, C]`` the direct parts' importances.
    head_sum / prev / same: ``[G, H, C]`` each head's summed importance, its importance on ``p - 1`` and on
        earlier subwords of ``p``'s word (``same`` needs ``words``).
    source: ``[G, H]`` summed importance over ``source_mask`` at row ``query`` (rows in this block only).
    hits: per-node slots (``tau``: the threshold) of this block's rows.
    """

    direct: torch.Tensor
    sub: torch.Tensor | None = None
    head_sum: torch.Tensor | None = None
    prev: torch.Tensor | None = None
    same: torch.Tensor | None = None
    words: torch.Tensor | None = None  # [G, J_grid] int: word of each grid position (-1: none)
    source: torch.Tensor | None = None
    source_mask: torch.Tensor | None = None  # [G, J_grid] int: 1 at the source positions
    query: torch.Tensor | None = None  # [G] int64 grid row of the query (-1: none)
    hits: HitSlots | None = None
    tau: float = 0.0


class Kernel:
    """The interface. Subclasses implement ``head_outputs``, ``sub_edge_block`` and ``finish_block``, and may
    override ``block`` (the fused form) and ``direct_node``."""

    name = ""
    whole_batch = False  # True: one block holds the whole padded batch (left padding included)

    def __init__(self, config: KernelConfig | None = None):
        self.config = config or KernelConfig()

    def head_outputs(self, values: torch.Tensor, w_o: torch.Tensor, w_flat: torch.Tensor | None = None
                     ) -> HeadOutputs:
        """Head outputs of values ``[G, H_kv, T, dh]`` and W_O ``[H, dh, d]`` (``w_flat``: its flat form)."""
        raise NotImplementedError

    def sub_edge_block(self, y, probs, heads: HeadOutputs, p0: int = 0, *, out=None) -> torch.Tensor:
        """Proximities ``[G, H, C, J]`` of rows ``y`` ``[G, C, d]`` with weights ``probs`` ``[G, H, C, J]``
        (zero for ``j > p``); ``out``: optional contiguous float32 destination."""
        raise NotImplementedError

    def finish_block(self, sub, y, parts: list[torch.Tensor], p0: int = 0) -> torch.Tensor:
        """Normalise: ``sub`` ``[G, H, C, J]`` (or None) scaled in place; returns the direct parts'
        importances ``[K, G, C]``."""
        raise NotImplementedError

    def direct_node(self, y: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        """Importances ``[K, N]`` of nodes ``y`` ``[N, d]`` made only of direct parts (K tensors ``[N, d]``)."""
        prox = proximity(torch.stack([z.float() for z in parts]), y.float())  # [K, N]
        total = prox.sum(0)
        return prox * torch.where(total > 0, 1.0 / torch.where(total > 0, total, 1.0), 0.0)

    def block_node(self, out_rows: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
        """Importances ``[2, N]`` of sequential blocks' nodes ``x^l`` (``out_rows`` ``[N, d]``) made of the
        attention node ``mid`` ``[N, d]`` (the residual edge) and the FFN's output ``out - mid``."""
        y = out_rows.float()
        return self.direct_node(y, [mid.float(), y - mid.float()])

    def plan(self, spans: list[tuple[int, int]], H: int, budget: int) -> list[tuple[int, int, int, int]]:
        """Blocks of a padded batch as ``(first, stop, offset, T_grid)``: batch rows ``first .. stop - 1`` on
        grid positions ``offset .. offset + T_grid - 1``. Default: one sequence per block, on its own span."""
        return [(b, b + 1, start, T) for b, (start, T) in enumerate(spans)]

    def rows_per_block(self, G: int, H: int, T: int, budget: int) -> int:
        if self.config.chunk_size is not None:
            return max(1, min(T, self.config.chunk_size))
        return max(1, min(T, budget // max(1, G * H * T)))

    def block(self, blk: Block, out: BlockOut) -> None:
        """Everything one block gives (see ``BlockOut``), composed from ``sub_edge_block`` and ``finish_block``.

        Blocks of this composition start every sequence at grid position 0 (``plan`` puts each left-padded
        sequence on its own span).
        """
        G, H, C, J = blk.shape
        probs = blk.probs if blk.row_scale is None else blk.probs * blk.row_scale[:, None, :, None]
        dest = out.sub if out.sub is not None and out.sub.is_contiguous() else None
        sub = self.sub_edge_block(blk.y, probs, blk.heads, blk.p0, out=dest)
        out.direct.copy_(self.finish_block(sub, blk.y, blk.parts, blk.p0))
        if out.sub is not None and sub is not out.sub:
            out.sub.copy_(sub)
        reduce_rows(sub, blk, out)


def reduce_rows(imp: torch.Tensor, blk: Block, out: BlockOut) -> None:
    """The job's per-row statistics of a block's normalised importances ``[G, H, C, J]`` (torch)."""
    G, H, C, J = imp.shape
    p0 = blk.p0
    pos = torch.arange(p0, p0 + C, device=imp.device)  # [C] grid rows
    if out.head_sum is not None:
        out.head_sum.copy_(imp.sum(-1))
    if out.prev is not None:
        before = (pos - 1).clamp_min(0)
        starts = torch.tensor(blk.starts, device=imp.device)
        has_prev = (pos[None, :] > starts[:, None]).to(imp.dtype)  # [G, C]
        out.prev.copy_(imp.gather(3, before[None, None, :, None].expand(G, H, C, 1))[..., 0] * has_prev[:, None])
    if out.same is not None:
        wi = out.words
        same = (wi[:, p0 : p0 + C, None] == wi[:, None, :J]) & (wi[:, p0 : p0 + C, None] >= 0)  # [G, C, J]
        same &= torch.arange(J, device=imp.device)[None, None, :] < pos[None, :, None]
        out.same.copy_(torch.einsum("ghcj,gcj->ghc", imp, same.to(imp.dtype)))
    if out.source is not None:
        for g in range(G):
            q = int(out.query[g])
            if p0 <= q < p0 + C:
                out.source[g] = (imp[g, :, q - p0, :] * out.source_mask[g, None, :J].to(imp.dtype)).sum(-1)
    if out.hits is not None:
        write_hits(imp, blk, out.hits, out.tau)


def write_hits(imp: torch.Tensor, blk: Block, slots: HitSlots, tau: float) -> None:
    """The sub-edges above ``tau`` of real rows into per-node slots, in (head, source) order."""
    G, H, C, J = imp.shape
    hit = torch.nonzero(imp > tau)  # [N, 4] (g, h, r, j), g-major then h, r, j
    lengths = torch.tensor(blk.lengths, device=imp.device)
    starts = torch.tensor(blk.starts, device=imp.device)
    row = hit[:, 2] + blk.p0  # grid row
    real = (row >= starts[hit[:, 0]]) & (row < starts[hit[:, 0]] + lengths[hit[:, 0]])
    hit = hit[real]
    node = hit[:, 0] * C + hit[:, 2]  # one node per (g, r)
    order = torch.sort(node, stable=True).indices  # (h, j) order kept within a node
    hit, node = hit[order], node[order]
    counts = torch.bincount(node, minlength=G * C)  # [G * C]
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(node.numel(), device=imp.device) - first[node]
    M = slots.head.shape[-1]
    fit = rank < M
    g, h, r, j = hit[fit].unbind(1)
    at = (g, r + blk.p0, rank[fit])
    slots.head[at] = h.to(slots.head.dtype)
    slots.source[at] = j.to(slots.source.dtype)
    slots.value[at] = imp[g, h, r, j]
    slots.count[:, blk.p0 : blk.p0 + C] = counts.view(G, C).to(slots.count.dtype)


def head_outputs_dense(values: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
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


def float32_head_outputs(values: torch.Tensor, w_o: torch.Tensor, w_flat: torch.Tensor | None, f_max_of
                         ) -> HeadOutputs:
    """The CPU and torch backends' ``head_outputs``: everything in float32, ``F`` materialised whole;
    ``f_max_of(F)``: each source's ``max |F|`` ``[(G,) H, T]``."""
    check_heads(w_o.shape[0], values.shape[-3])
    values, w_o = values.float(), w_o.float()
    F = head_outputs_dense(values, w_o)  # [(G,) H, T, d]
    w_flat = flat_output_projection(w_o) if w_flat is None else w_flat.float()
    return HeadOutputs(values=values, w_o=w_o, w_flat=w_flat, F=F, f_max=f_max_of(F))


def flat_output_projection(w_o: torch.Tensor) -> torch.Tensor:
    """``[H, dh, d]`` -> ``[d, H * dh]`` contiguous, same dtype (column block h is ``W_O^h^T``)."""
    H, dh, d = w_o.shape
    return w_o.permute(2, 0, 1).reshape(d, H * dh).contiguous()


def proximity(parts: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``prox(z, y) = relu(||y||_1 - ||y - z||_1)`` for parts ``[K, ..., d]`` of nodes ``[..., d]`` -> ``[K, ...]``."""
    y_norm = y.abs().sum(-1)
    return (y_norm - (y - parts).abs().sum(-1)).clamp_min(0)


def check_heads(H: int, H_kv: int) -> None:
    from flowray.errors import InputError

    if H_kv == 0 or H % H_kv:
        raise InputError(f"query heads H={H} must be a multiple of kv heads H_kv={H_kv}")
