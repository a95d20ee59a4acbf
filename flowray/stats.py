"""Streamed, sparse, device-resident prediction statistics: what the corpus job records per prediction.

``prediction_stats`` gives, for every position of a sequence, exactly what the dense path
(``edge_importances`` -> ``component_importance()``, ``tables.head_shares`` and ``routes.route_masks``)
gives, without ever forming the ``[L, H, T, T]`` result. While the capture visits a layer, its sub-edge
importances are computed one chunk of query rows at a time (``[H, C, T]``, the attention weights of the
chunk recomputed from the layer's queries and keys) and reduced at once, on the model's device, to

- each head's summed importance per position (the section 4 component vector),
- each head's importance on the previous token and on earlier subwords of the same word,
- the sparse set of sub-edges above the smallest tau: a node's importances sum to 1, so at most
  ``1 / tau_min`` of its parts exceed ``tau_min``.

After the last layer every position's route at every tau is extracted top-down over that sparse graph
(appendix B.2; the same rules as ``extract_route`` and ``route_masks``) as sorted integer pairs on the
device. Only the ``O(T * (L*H + L))`` numbers and the route index lists go to the host. Peak extra memory
is one layer's queries, keys and head outputs plus one ``[H, C, T]`` chunk: linear in ``T``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from flowray.api import _unpack, pad_sequences, padded_forward_inputs
from flowray.capture import LayerActivations, capture_layers, predicted_ids
from flowray.errors import InputError
from flowray.models.modes import eval_mode
from flowray.importance import (
    DEFAULT_ELEMENT_BUDGET,
    direct_node,
    finish_rows,
    flat_output_projection,
    head_outputs_of,
    resolve_backend,
    sub_edge_rows,
)


@dataclass
class PredictionStats:
    """One sequence's per-prediction statistics. ``T`` positions, ``L`` layers, ``H`` heads; numpy.

    Flat head ids are ``layer * H + head`` (the corpus tables' convention); routes are per position.
    """

    taus: tuple[float, ...]
    n_layers: int
    n_heads: int
    parallel: bool
    token_ids: np.ndarray  # [T] int64
    predicted_ids: np.ndarray  # [T] int64, the model's top-1 next token
    components: np.ndarray  # [T, L*H + L] float32: heads' summed sub-edge importances, then FFNs
    route_heads: dict[float, list[np.ndarray]]  # tau -> T arrays of flat head ids (ascending)
    route_ffn: dict[float, list[np.ndarray]]  # tau -> T arrays of layers whose FFN edge is in the route
    prev_share: np.ndarray | None = None  # [T, L*H] share of each head's influence on pos - 1 (NaN: undefined)
    same_word_share: np.ndarray | None = None  # [T, L*H] ... on earlier subwords of the same word
    # tau -> T arrays of flat head ids whose tau-pruned, renormalised importance at the position's own
    # attention node exceeds ``active_above`` (every part <= tau dropped, the node's kept parts rescaled to 1)
    pruned_heads: dict[float, list[np.ndarray]] = field(default_factory=dict)
    source_edges: np.ndarray | None = None  # [L*H] sum_j e^h_{query,j} over the asked source positions j
    meta: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def host_bytes(self) -> int:
        """Bytes of the statistics on the host (what crossed from the device for this sequence)."""
        arrays = [self.token_ids, self.predicted_ids, self.components, self.prev_share, self.same_word_share]
        arrays += [self.source_edges]
        arrays += [a for rows in (*self.route_heads.values(), *self.route_ffn.values(), *self.pruned_heads.values())
                   for a in rows]
        return int(sum(a.nbytes for a in arrays if a is not None))


def check_taus(taus) -> tuple[float, ...]:
    """Distinct thresholds strictly between 0 and 1 (tau = 0 would keep every part: no sparsity)."""
    given = taus
    if isinstance(taus, (int, float, bool, str)):
        taus = (taus,)
    try:
        taus = tuple(taus)
    except TypeError:
        taus = ()
    if not taus or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1 for t in taus):
        raise InputError("taus must be a number or a list of numbers strictly between 0 and 1 (the paper uses "
                         f"0.01 to 0.04); got {given!r}")
    return tuple(float(t) for t in taus)


@torch.no_grad()
def prediction_stats(
    model,
    input_ids,
    taus,
    *,
    word_index=None,
    first_subword=None,
    source=None,
    active_above: float = 0.0,
    backend: str = "auto",
    element_budget: int | None = None,
) -> PredictionStats:
    """The corpus job's statistics of one ``[1, T]`` sequence, streamed (see the module docstring).

    Args:
        model: a supported ``transformers`` causal LM or a ``flowray.LoadedModel``.
        input_ids: ``[1, T]`` token ids.
        taus: route thresholds in (0, 1).
        word_index: optional ``[T]`` ints, the word of each token (-1: no word); with ``first_subword``
            (``[T]`` bools) it gives ``prev_share`` and ``same_word_share``.
        source: optional ``(query, positions)``: ``source_edges`` is then each head's importance of the
            sub-edges from those positions to position ``query`` (e.g. the indirect object -> the last token).
        active_above: ``pruned_heads[tau]`` lists the heads whose pruned, renormalised importance at a
            position exceeds this (0: every head with a sub-edge above tau there).
        backend: the importance kernel (``"auto"``, ``"cpu"``, ``"torch"``).
        element_budget: elements of one chunk of importances ``[H, C, T]``; sets ``C`` (None: 4M on the
            CPU, where chunks stay in cache, 64M on GPUs, where fewer and larger kernels win).
    """
    words = None if word_index is None else [(word_index, first_subword)]
    return prediction_stats_batch(model, [input_ids], taus, words=words, sources=[source],
                                  active_above=active_above, backend=backend, element_budget=element_budget)[0]


@torch.no_grad()
def prediction_stats_batch(
    model,
    sequences: list,
    taus,
    *,
    words: list | None = None,
    sources: list | None = None,
    active_above: float = 0.0,
    padding_side: str = "right",
    backend: str = "auto",
    element_budget: int | None = None,
) -> list[PredictionStats]:
    """``prediction_stats`` of several ``[1, T_i]`` sequences in one padded forward pass.

    ``words``: None, or one ``(word_index, first_subword)`` pair (each ``[T_i]``) per sequence;
    ``sources``: None, or one ``(query, positions)`` pair or None per sequence.
    """
    if not sequences:
        return []
    input_ids, attention_mask = pad_sequences(model, sequences, padding_side)
    return prediction_stats_padded(model, input_ids, attention_mask, taus, words=words, sources=sources,
                                   active_above=active_above, backend=backend, element_budget=element_budget)


@torch.no_grad()
def prediction_stats_padded(
    model,
    input_ids,
    attention_mask,
    taus,
    *,
    words: list | None = None,
    sources: list | None = None,
    active_above: float = 0.0,
    backend: str = "auto",
    element_budget: int | None = None,
) -> list[PredictionStats]:
    """``prediction_stats`` for a padded batch ``[B, T]`` with its attention mask (left or right padding)."""
    hf_model, adapter, _, name = _unpack(model)
    taus = check_taus(taus)
    device = next(hf_model.parameters()).device
    if element_budget is None:  # GPUs: one chunk per layer up to long contexts (fewer, larger kernels)
        element_budget = DEFAULT_ELEMENT_BUDGET if device.type == "cpu" else GPU_ELEMENT_BUDGET
    if isinstance(element_budget, bool) or not isinstance(element_budget, int) or element_budget < 1:
        raise InputError(f"element_budget must be a positive integer; got {element_budget!r}")
    input_ids, spans, forward_kwargs = padded_forward_inputs(hf_model, adapter, input_ids, attention_mask)
    if words is not None and len(words) != len(spans):
        raise InputError(f"words must hold one (word_index, first_subword) pair per sequence: {len(spans)}; "
                         f"got {len(words)}")
    if sources is not None and len(sources) != len(spans):
        raise InputError(f"sources must hold one (query, positions) pair or None per sequence: {len(spans)}; "
                         f"got {len(sources)}")
    if isinstance(active_above, bool) or not isinstance(active_above, (int, float)) or not 0 <= active_above < 1:
        raise InputError(f"active_above must be a number in [0, 1); got {active_above!r}")
    backend = resolve_backend(backend, device)
    s = adapter.shape
    states = [_Sequence(s.n_layers, s.n_heads, T, s.parallel, min(taus), device,
                        None if words is None else words[b], None if sources is None else sources[b])
              for b, (_, T) in enumerate(spans)]
    layers = adapter.layers()

    def consume(rec: LayerActivations) -> None:
        w_o, _bias = adapter.output_projection(layers[rec.layer])  # the bias is in the node, in no edge
        w_o = w_o.detach().float()  # [H, dh, d]
        w_flat = flat_output_projection(w_o)  # [d, H * dh], once per layer for every sequence
        for b, span in enumerate(spans):
            states[b].add_layer(rec, b, span, w_o, w_flat, backend, element_budget)

    top: list[torch.Tensor] = []
    with eval_mode(hf_model), capture_layers(hf_model, adapter, consume, rows=True, reuse_probs=True), \
            predicted_ids(hf_model, top):
        hf_model(**forward_kwargs)
    predicted = top[0]  # [B, T] on the device
    return [st.finish(taus, input_ids[b, start : start + T], predicted[b, start : start + T], name, active_above)
            for b, ((start, T), st) in enumerate(zip(spans, states))]


class _Sequence:
    """One sequence's running reductions, on the device, filled layer by layer."""

    def __init__(self, L: int, H: int, T: int, parallel: bool, tau_min: float, device, words, source=None):
        self.L, self.H, self.T, self.parallel, self.tau_min = L, H, T, parallel, tau_min
        zeros = dict(dtype=torch.float32, device=device)
        self.head_sum = torch.zeros(L, H, T, **zeros)  # sum_j e^h_{pos,j}
        self.attn_residual = torch.zeros(L, T, **zeros)
        self.ffn = torch.zeros(L, T, **zeros)
        self.ffn_residual = None if parallel else torch.zeros(L, T, **zeros)
        self.sparse: list[tuple[torch.Tensor, torch.Tensor]] = [None] * L  # (h, pos, j) [N, 3], values [N]
        self.prev = self.same = self.word_index = self.first = None
        if words is not None:
            word_index, first = words
            self.word_index = torch.as_tensor(np.asarray(word_index)[:T], dtype=torch.long, device=device)
            self.first = torch.as_tensor(np.asarray(first, dtype=bool)[:T], device=device)
            if self.word_index.shape != (T,) or self.first.shape != (T,):
                raise InputError(f"word_index and first_subword must have one entry per token ({T}); got "
                                 f"{tuple(self.word_index.shape)} and {tuple(self.first.shape)}")
            self.prev = torch.zeros(L, H, T, **zeros)  # e^h_{pos,pos-1}
            self.same = torch.zeros(L, H, T, **zeros)  # sum over earlier subwords of pos's word
        self.query = self.source_positions = self.source_edges = None
        if source is not None:
            self.query, self.source_positions = _check_source(source, T, device)
            self.source_edges = torch.zeros(L, H, **zeros)

    def add_layer(self, rec: LayerActivations, b: int, span: tuple[int, int], w_o, w_flat, backend: str,
                  budget: int):
        l, (start, T), H = rec.layer, span, self.H
        rows = slice(start, start + T)
        x = rec.inputs[b, rows].float()  # [T, d]
        attn_out = rec.attn_out[b, rows].float()
        out = rec.outputs[b, rows].float()
        heads = head_outputs_of(rec.values[b, :, rows], w_o, backend=backend, w_flat=w_flat)  # F [H, T, d]
        if self.parallel:
            y, parts = out, torch.stack([x, out - x - attn_out])  # [T, d], [2, T, d]
        else:
            y = x + attn_out  # x^{lA}
            parts = x[None]  # [1, T, d]
        row_scale = rec.row_scale  # [B, T] post-attention norms' 1/r_pos, if any
        C = max(1, min(T, budget // max(1, H * T)))  # query rows per chunk: [H, C, T] within the budget
        scratch = torch.empty(H * C * T, dtype=torch.float32, device=y.device)
        for p0 in range(0, T, C):
            p1 = min(T, p0 + C)
            probs = rec.prob_rows(b, start, p0, p1)  # [H, c, p1]
            if row_scale is not None:
                probs = probs * row_scale[b, start + p0 : start + p1][None, :, None]
            dest = scratch[: H * (p1 - p0) * p1].view(H, p1 - p0, p1)
            sub = sub_edge_rows(y[p0:p1], probs, heads, p0, backend=backend, out=dest)
            node = finish_rows(sub, y[p0:p1], parts[:, p0:p1], p0, backend=backend)
            self._reduce_rows(l, p0, p1, node.attn)
            if self.parallel:
                self.attn_residual[l, p0:p1], self.ffn[l, p0:p1] = node.direct
            else:
                self.attn_residual[l, p0:p1] = node.direct[0]
        if not self.parallel:
            block = direct_node(out, torch.stack([y, out - y]), backend=backend)
            self.ffn_residual[l], self.ffn[l] = block.direct

    def _reduce_rows(self, l: int, p0: int, p1: int, imp: torch.Tensor) -> None:
        """Fold a chunk's importances ``[H, C, p1]`` (rows p0..p1-1) into the running statistics."""
        H, C, J = imp.shape
        self.head_sum[l, :, p0:p1] = imp.sum(-1)
        if self.prev is not None:
            pos = torch.arange(p0, p1, device=imp.device)  # [C]
            before = (pos - 1).clamp_min(0)
            self.prev[l, :, p0:p1] = imp.gather(2, before[None, :, None].expand(H, C, 1))[..., 0] * (pos > 0)
            wi = self.word_index
            same = (wi[p0:p1, None] == wi[None, :J]) & (wi[p0:p1, None] >= 0)  # [C, J]
            same &= torch.arange(J, device=imp.device)[None, :] < pos[:, None]  # earlier positions only
            self.same[l, :, p0:p1] = torch.einsum("hcj,cj->hc", imp, same.to(imp.dtype))
        if self.query is not None and p0 <= self.query < p1:
            self.source_edges[l] = imp[:, self.query - p0, self.source_positions].sum(-1)
        hit = torch.nonzero(imp > self.tau_min)  # [N, 3] (h, row, j); at most ~1/tau_min per node
        values = imp[hit[:, 0], hit[:, 1], hit[:, 2]]
        hit[:, 1] += p0
        prev = self.sparse[l]
        self.sparse[l] = (hit, values) if prev is None else (torch.cat([prev[0], hit]), torch.cat([prev[1], values]))

    def pruned_heads(self, tau: float, active_above: float) -> list[np.ndarray]:
        """Per position, the flat heads whose importance at its own attention node, after every part <= tau
        is dropped and the kept parts are rescaled to sum to 1, exceeds ``active_above``."""
        L, H, T = self.L, self.H, self.T
        kept_heads = torch.zeros(L, H, T, dtype=torch.float32, device=self.head_sum.device)
        for l, (hit, values) in enumerate(self.sparse):
            keep = values > tau
            kept_heads[l].index_put_((hit[keep, 0], hit[keep, 1]), values[keep], accumulate=True)
        node = kept_heads.sum(1) + self.attn_residual * (self.attn_residual > tau)  # [L, T] kept parts
        if self.parallel:  # the FFN is a part of the same node
            node = node + self.ffn * (self.ffn > tau)
        pruned = kept_heads / torch.where(node > 0, node, 1.0)[:, None, :]
        lhp = torch.nonzero(pruned > active_above)  # [k, 3] (layer, head, pos)
        keys = torch.sort(lhp[:, 2] * (L * H) + lhp[:, 0] * H + lhp[:, 1]).values
        return _split(keys, L * H, T)

    def finish(self, taus, token_ids, predicted, name: str, active_above: float = 0.0) -> PredictionStats:
        L, H, T = self.L, self.H, self.T
        heads = self.head_sum.permute(2, 0, 1).reshape(T, L * H)  # [T, L*H]
        components = torch.cat([heads, self.ffn.T], dim=1)  # [T, L*H + L]
        route_heads, route_ffn = {}, {}
        for tau in taus:
            head_keys, ffn_keys = _routes(self, tau)
            route_heads[tau] = _split(head_keys, L * H, T)
            route_ffn[tau] = _split(ffn_keys, L, T)
        prev = same = None
        if self.prev is not None:
            total = self.head_sum
            nan = torch.tensor(float("nan"), device=total.device)
            ok = total > 0
            prev = torch.where(ok, self.prev / torch.where(ok, total, 1.0), nan)
            prev[:, :, 0] = float("nan")
            ok_same = ok & (~self.first & (self.word_index >= 0))[None, None, :]  # later subwords only
            same = torch.where(ok_same, self.same / torch.where(ok, total, 1.0), nan)
            prev = prev.permute(2, 0, 1).reshape(T, L * H).cpu().numpy()
            same = same.permute(2, 0, 1).reshape(T, L * H).cpu().numpy()
        return PredictionStats(
            taus=tuple(taus), n_layers=L, n_heads=H, parallel=self.parallel,
            token_ids=token_ids.cpu().numpy().astype(np.int64), predicted_ids=predicted.cpu().numpy().astype(np.int64),
            components=components.cpu().numpy(), route_heads=route_heads, route_ffn=route_ffn,
            prev_share=prev, same_word_share=same,
            pruned_heads={tau: self.pruned_heads(tau, active_above) for tau in taus},
            source_edges=None if self.source_edges is None else self.source_edges.reshape(L * H).cpu().numpy(),
            meta={"model": name},
        )


def _check_source(source, T: int, device) -> tuple[int, torch.Tensor]:
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
    return query, torch.tensor(positions, dtype=torch.long, device=device)


# Elements of one [H, C, T] chunk on GPUs (256 MiB of float32): Llama-2-7B at 2k tokens in one chunk.
GPU_ELEMENT_BUDGET = 1 << 26
# Routes of this many predictions at a time: the reached sets are [T, chunk] floats (linear in T).
ROUTE_CHUNK = 1024
# Up to this many positions a layer's edges are a dense [T, T] matrix (a GEMM is cheapest); above it a
# sparse CSR matrix (at most ~T / tau_min entries) keeps memory linear in T.
DENSE_EDGES_UP_TO = 1024


def _sparse_edge_matrix(src: torch.Tensor, dst: torch.Tensor, T: int) -> torch.Tensor:
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


def _routes(seq: _Sequence, tau: float, dense: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position's route at ``tau``, top-down over the sparse graph, predictions in chunks.

    Returns sorted unique keys ``p * L*H + flat_head`` and ``p * L + layer``. The rules are
    ``route_masks``': at block l the FFN edge is in p's route when a reached position keeps its FFN part;
    the attention node of a reached position is reached when its FFN or residual part survives
    (sequential blocks); from a reached attention node every kept sub-edge (pos, j) and a kept residual
    reach position j (resp. pos) one block down, and every head with a kept sub-edge there is in the route.
    """
    L, H, T, dev = seq.L, seq.H, seq.T, seq.head_sum.device
    dense = T <= DENSE_EDGES_UP_TO if dense is None else dense
    # every layer's kept parts at once: [N, 4] (layer, head, pos, j) sub-edges, [L, T] direct parts
    hit = torch.cat([torch.cat([torch.full_like(h[:, :1], l), h], 1)[v > tau] for l, (h, v) in enumerate(seq.sparse)])
    ffn_keep = (seq.ffn > tau).float()  # [L, T]
    res_keep = seq.attn_residual > tau
    self_keep = res_keep | (seq.ffn > tau) if seq.parallel else res_keep
    through = None if seq.parallel else ((seq.ffn > tau) | (seq.ffn_residual > tau)).float()[:, :, None]
    at_node = torch.zeros(L, H, T, dtype=torch.float32, device=dev)  # head with a kept sub-edge at pos
    at_node[hit[:, 0], hit[:, 1], hit[:, 2]] = 1.0
    selfs = torch.nonzero(self_keep)  # [S, 2] (layer, pos)
    if dense:  # [L, T, T]: E[l, j, pos] = 1 when pos keeps a part from j one block down
        E = torch.zeros(L, T, T, dtype=torch.float32, device=dev)
        E[hit[:, 0], hit[:, 3], hit[:, 2]] = 1.0
        E[selfs[:, 0], selfs[:, 1], selfs[:, 1]] = 1.0
        edges = list(E)
    else:
        edges = [_sparse_edge_matrix(torch.cat([hit[hit[:, 0] == l, 2], selfs[selfs[:, 0] == l, 1]]),
                                     torch.cat([hit[hit[:, 0] == l, 3], selfs[selfs[:, 0] == l, 1]]), T)
                 for l in range(L)]
    head_keys, ffn_keys = [], []
    for c0 in range(0, T, ROUTE_CHUNK):
        c1 = min(T, c0 + ROUTE_CHUNK)
        P = c1 - c0
        reached = torch.zeros(T, P, dtype=torch.float32, device=dev)  # [pos, p]: p reaches pos atop block l
        reached[torch.arange(c0, c1, device=dev), torch.arange(P, device=dev)] = 1.0
        heads_on = torch.empty(L, H, P, dtype=torch.bool, device=dev)
        ffn_on = torch.empty(L, P, dtype=torch.bool, device=dev)
        for l in range(L - 1, -1, -1):
            ffn_on[l] = (ffn_keep[l] @ reached) > 0  # [P]
            M = reached if through is None else reached * through[l]  # [T, P] attention nodes reached
            heads_on[l] = (at_node[l] @ M) > 0  # [H, P]
            reached = ((edges[l] @ M) > 0).float()  # [T, P]
        lhp = torch.nonzero(heads_on)  # [k, 3] (layer, head, p)
        head_keys.append((lhp[:, 2] + c0) * (L * H) + lhp[:, 0] * H + lhp[:, 1])
        lp = torch.nonzero(ffn_on)  # [k, 2] (layer, p)
        ffn_keys.append((lp[:, 1] + c0) * L + lp[:, 0])
    return torch.unique(torch.cat(head_keys)), torch.unique(torch.cat(ffn_keys))


def _split(keys: torch.Tensor, width: int, T: int) -> list[np.ndarray]:
    """Sorted keys ``p * width + value`` -> T arrays of values (ascending), one per position p."""
    keys = keys.cpu().numpy()
    counts = np.bincount(keys // width, minlength=T)
    return np.split((keys % width).astype(np.int64), np.cumsum(counts)[:-1])
