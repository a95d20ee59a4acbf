"""Routes over the sparse graph of kept sub-edges that ``flowray.stats`` gathers while the model runs.

Routes are extracted top-down (appendix B.2; the same rules as ``flowray.routes.extract_route`` and
``route_masks``) for many predictions at once, as sorted integer keys on the model's device: a reached set
``[T, P]`` of predictions moves one block down per layer through that layer's kept edges (a dense
``[T, T]`` GEMM up to ``DENSE_EDGES_UP_TO`` positions, a sparse CSR matrix above it). ``merge`` lays
several sequences' graphs side by side (no edge between them), so that one pass finds a route in each.
Shapes: ``L`` layers, ``H`` heads, ``T`` positions, ``N`` sub-edges above the smallest tau.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Routes of this many predictions at a time: the reached sets are [T, chunk] floats (linear in T).
ROUTE_CHUNK = 1024
# Up to this many positions a layer's edges are a dense [T, T] matrix (a GEMM is cheapest); above it a
# sparse CSR matrix (at most ~T / tau_min entries) keeps memory linear in T.
DENSE_EDGES_UP_TO = 1024


@dataclass(frozen=True)
class Graph:
    """One sequence's importances as a route needs them, on the model's device."""

    L: int
    H: int
    T: int
    parallel: bool  # attention and FFN read the same input (one node per block)
    hit: torch.Tensor  # [N, 4] int64 (layer, head, pos, j): the sub-edges above the smallest tau
    values: torch.Tensor  # [N] their importances
    attn_residual: torch.Tensor  # [L, T] the residual's importance at each attention node
    ffn: torch.Tensor  # [L, T] the FFN's importance (at the block node; parallel: at the attention node)
    ffn_residual: torch.Tensor | None  # [L, T] the residual's importance at the block node (sequential blocks)


def merge(graphs: list[Graph]) -> tuple[Graph, list[int]]:
    """The graphs side by side as one of ``sum T`` positions, and where each one's positions start."""
    first = graphs[0]
    offsets = np.cumsum([0] + [g.T for g in graphs[:-1]]).tolist()
    shift = [torch.tensor([0, 0, o, o], device=first.hit.device) for o in offsets]
    cat = (lambda name: None if getattr(first, name) is None
           else torch.cat([getattr(g, name) for g in graphs], dim=1))
    merged = Graph(first.L, first.H, sum(g.T for g in graphs), first.parallel,
                   torch.cat([g.hit + s for g, s in zip(graphs, shift)]), torch.cat([g.values for g in graphs]),
                   cat("attn_residual"), cat("ffn"), cat("ffn_residual"))
    return merged, offsets


def sparse_edge_matrix(src: torch.Tensor, dst: torch.Tensor, T: int) -> torch.Tensor:
    """``[T, T]`` sparse CSR matrix with 1 at ``(dst, src)``: multiplying a reached set ``[T, P]`` by it moves
    every prediction from each source position to all the positions its kept edges lead to."""
    keys = torch.unique(dst * T + src)  # sorted by row: CSR straight away, no duplicates
    rows = keys // T
    crow = torch.zeros(T + 1, dtype=torch.long, device=src.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=T), 0)
    ones = torch.ones(keys.numel(), dtype=torch.float32, device=src.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR @ dense is all we use
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, keys % T, ones, size=(T, T))


def routes_of(graph: Graph, tau: float, targets: torch.Tensor | None = None,
              dense: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The routes at ``tau`` of the predictions at ``targets`` (``[P]`` positions; None: every position),
    top-down over the sparse graph, predictions in chunks.

    Returns sorted unique keys ``k * L*H + flat_head`` and ``k * L + layer`` for target ``k``. The rules are
    ``route_masks``': at block l the FFN edge is in p's route when a reached position keeps its FFN part;
    the attention node of a reached position is reached when its FFN or residual part survives
    (sequential blocks); from a reached attention node every kept sub-edge (pos, j) and a kept residual
    reach position j (resp. pos) one block down, and every head with a kept sub-edge there is in the route.
    """
    g = graph
    L, H, T, dev = g.L, g.H, g.T, g.ffn.device
    targets = torch.arange(T, device=dev) if targets is None else targets
    dense = T <= DENSE_EDGES_UP_TO if dense is None else dense
    hit = g.hit[g.values > tau]  # [N, 4] (layer, head, pos, j) kept sub-edges; [L, T] direct parts below
    ffn_keep = (g.ffn > tau).float()  # [L, T]
    res_keep = g.attn_residual > tau
    self_keep = res_keep | (g.ffn > tau) if g.parallel else res_keep
    through = None if g.parallel else ((g.ffn > tau) | (g.ffn_residual > tau)).float()[:, :, None]
    at_node = torch.zeros(L, H, T, dtype=torch.float32, device=dev)  # head with a kept sub-edge at pos
    at_node[hit[:, 0], hit[:, 1], hit[:, 2]] = 1.0
    selfs = torch.nonzero(self_keep)  # [S, 2] (layer, pos)
    if dense:  # [L, T, T]: E[l, j, pos] = 1 when pos keeps a part from j one block down
        E = torch.zeros(L, T, T, dtype=torch.float32, device=dev)
        E[hit[:, 0], hit[:, 3], hit[:, 2]] = 1.0
        E[selfs[:, 0], selfs[:, 1], selfs[:, 1]] = 1.0
        edges = list(E)
    else:
        edges = [sparse_edge_matrix(torch.cat([hit[hit[:, 0] == l, 2], selfs[selfs[:, 0] == l, 1]]),
                                    torch.cat([hit[hit[:, 0] == l, 3], selfs[selfs[:, 0] == l, 1]]), T)
                 for l in range(L)]
    head_keys, ffn_keys = [], []
    for c0 in range(0, len(targets), ROUTE_CHUNK):
        chunk = targets[c0 : c0 + ROUTE_CHUNK]
        P = len(chunk)
        reached = torch.zeros(T, P, dtype=torch.float32, device=dev)  # [pos, k]: k reaches pos atop block l
        reached[chunk, torch.arange(P, device=dev)] = 1.0
        heads_on = torch.empty(L, H, P, dtype=torch.bool, device=dev)
        ffn_on = torch.empty(L, P, dtype=torch.bool, device=dev)
        for l in range(L - 1, -1, -1):
            ffn_on[l] = (ffn_keep[l] @ reached) > 0  # [P]
            M = reached if through is None else reached * through[l]  # [T, P] attention nodes reached
            heads_on[l] = (at_node[l] @ M) > 0  # [H, P]
            reached = ((edges[l] @ M) > 0).float()  # [T, P]
        lhp = torch.nonzero(heads_on)  # [k, 3] (layer, head, k)
        head_keys.append((lhp[:, 2] + c0) * (L * H) + lhp[:, 0] * H + lhp[:, 1])
        lp = torch.nonzero(ffn_on)  # [k, 2] (layer, k)
        ffn_keys.append((lp[:, 1] + c0) * L + lp[:, 0])
    return torch.unique(torch.cat(head_keys)), torch.unique(torch.cat(ffn_keys))


def split_keys(keys: torch.Tensor, width: int, T: int) -> KeyRows:
    """Sorted keys ``p * width + value`` -> T rows of values (ascending), one per position p."""
    return KeyRows(keys, width, T)


class KeyRows(Sequence):
    """T rows of values held as sorted keys ``p * width + value``: ``rows[p]`` is position p's values.

    The host copy of the keys is started without waiting (pinned memory on CUDA) and split only when a row,
    ``values`` or ``offsets`` is first read, with a few vectorised numpy calls: the corpus job writes
    ``offsets``/``values`` straight into a list column on its writer thread, never making T small arrays.
    """

    def __init__(self, keys: torch.Tensor, width: int, T: int):
        self.width, self.T = width, T
        self._keys = keys.to("cpu", non_blocking=True)
        self._copied = None
        if keys.device.type == "cuda":  # the copy is in flight: wait for it (once) before reading
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(keys.device))
        self._values = self._offsets = None

    @classmethod
    def from_offsets(cls, values: np.ndarray, offsets: np.ndarray) -> KeyRows:
        """Rows already split on the host: row p is ``values[offsets[p] : offsets[p + 1]]``."""
        rows = cls.__new__(cls)
        rows.width, rows.T = None, len(offsets) - 1
        rows._keys = rows._copied = None
        rows._values, rows._offsets = values, offsets
        return rows

    def _split(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()
        keys = self._keys.numpy().astype(np.int64, copy=False)  # sorted: row p is [p * width, (p + 1) * width)
        starts = np.arange(self.T + 1, dtype=np.int64) * self.width
        self._offsets = np.searchsorted(keys, starts)  # [T + 1]
        self._values = keys - np.repeat(starts[:-1], np.diff(self._offsets))  # no division: ~5x faster
        self._keys = self._copied = None

    @property
    def values(self) -> np.ndarray:
        """Every row's values, row after row ``[n]``."""
        if self._values is None:
            self._split()
        return self._values

    @property
    def offsets(self) -> np.ndarray:
        """Where each row starts in ``values`` ``[T + 1]``."""
        if self._offsets is None:
            self._split()
        return self._offsets

    def __len__(self) -> int:
        return self.T

    def __getitem__(self, p):
        if isinstance(p, slice):
            return [self[i] for i in range(*p.indices(self.T))]
        p = int(p)
        if not -self.T <= p < self.T:
            raise IndexError(f"row {p} of {self.T}")
        p %= self.T
        return self.values[self.offsets[p] : self.offsets[p + 1]]

    def __iter__(self):
        values, offsets = self.values, self.offsets
        return (values[offsets[p] : offsets[p + 1]] for p in range(self.T))
