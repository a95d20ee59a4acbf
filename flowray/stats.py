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

from dataclasses import dataclass, field

import numpy as np
import torch

from flowray.api import _unpack, pad_sequences, padded_forward_inputs
from flowray.capture import LayerActivations, capture_layers, predicted_ids
from flowray.errors import InputError
from flowray.models.modes import eval_mode
from flowray.sparse_routes import Graph, merge, routes_of, split_keys
from flowray.importance import (
    DEFAULT_ELEMENT_BUDGET,
    HeadOutputs,
    direct_node,
    finish_block,
    finish_rows,
    flat_output_projection,
    head_outputs_of,
    resolve_backend,
    sub_edge_block,
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
    predicted_ids: np.ndarray  # [T] int64, the model's top-1 next token (predictions="last": -1 but at T - 1)
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
    active_above: float | None = 0.0,
    predictions: str = "all",
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
            position exceeds this (0: every head with a sub-edge above tau there; None: not computed, ``{}``).
        predictions: the predictions studied: ``"all"`` (every position's route and top-1 next token) or
            ``"last"`` (the last position's only: the other positions' routes are empty and their
            ``predicted_ids`` -1; the output embedding sees one row). The importances are every position's.
        backend: the importance kernel (``"auto"``, ``"cpu"``, ``"torch"``).
        element_budget: elements of one chunk of importances ``[H, C, T]``; sets ``C`` (None: 4M on the
            CPU, where chunks stay in cache, 64M on GPUs, where fewer and larger kernels win).
    """
    words = None if word_index is None else [(word_index, first_subword)]
    return prediction_stats_batch(model, [input_ids], taus, words=words, sources=[source], active_above=active_above,
                                  predictions=predictions, backend=backend, element_budget=element_budget)[0]


@torch.no_grad()
def prediction_stats_batch(
    model,
    sequences: list,
    taus,
    *,
    words: list | None = None,
    sources: list | None = None,
    active_above: float | None = 0.0,
    predictions: str = "all",
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
                                   active_above=active_above, predictions=predictions, backend=backend,
                                   element_budget=element_budget)


@torch.no_grad()
def prediction_stats_padded(
    model,
    input_ids,
    attention_mask,
    taus,
    *,
    words: list | None = None,
    sources: list | None = None,
    active_above: float | None = 0.0,
    predictions: str = "all",
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
    if active_above is not None and (isinstance(active_above, bool) or not isinstance(active_above, (int, float))
                                     or not 0 <= active_above < 1):
        raise InputError(f"active_above must be a number in [0, 1) or None (no pruned_heads); got {active_above!r}")
    if predictions not in PREDICTIONS:
        raise InputError(f"predictions must be one of {list(PREDICTIONS)} (every position's routes and top-1 "
                         f"tokens, or the last position's); got {predictions!r}")
    backend = resolve_backend(backend, device)
    s = adapter.shape
    states = [_Sequence(s.n_layers, s.n_heads, T, s.parallel, min(taus), device,
                        None if words is None else words[b], None if sources is None else sources[b])
              for b, (_, T) in enumerate(spans)]
    layers = adapter.layers()

    blocks = _blocks(spans, s.n_heads, element_budget, backend)

    def consume(rec: LayerActivations) -> None:
        w_o, _bias = adapter.output_projection(layers[rec.layer])  # the bias is in the node, in no edge
        w_o = w_o.detach().float()  # [H, dh, d]
        w_flat = flat_output_projection(w_o)  # [d, H * dh], once per layer for every sequence
        whole = isinstance(rec.probs, torch.Tensor)  # the layer's weights are held, not recomputed by rows
        for first, stop in blocks:
            if stop - first > 1 and not whole:  # recomputed weights come a sequence at a time
                for b in range(first, stop):
                    _add_layer(states, b, b + 1, spans, rec, w_o, w_flat, backend, element_budget)
            else:
                _add_layer(states, first, stop, spans, rec, w_o, w_flat, backend, element_budget)

    top: list[torch.Tensor] = []
    last = None if predictions == "all" else [start + T - 1 for start, T in spans]
    with eval_mode(hf_model), capture_layers(hf_model, adapter, consume, rows=True, reuse_probs=True), \
            predicted_ids(hf_model, top, positions=last):
        hf_model(**forward_kwargs)
    if last is None:
        predicted = top[0]  # [B, T_pad] on the device
    else:  # [B, T_pad]: -1 except at each sequence's last position
        predicted = torch.full(input_ids.shape, -1, dtype=torch.long, device=top[0].device)
        predicted[torch.arange(len(last), device=predicted.device), torch.tensor(last, device=predicted.device)] = top[0]
    graphs = [st.graph() for st in states]  # the routes and the pruned heads read them
    routes = [None] * len(states) if predictions == "all" else _last_routes(states, graphs, taus)
    out = [st.finish(taus, input_ids[b, start : start + T], predicted[b, start : start + T], name, graphs[b],
                     active_above, routes[b]) for b, ((start, T), st) in enumerate(zip(spans, states))]
    if device.type == "cuda":  # every host copy in finish() was started without waiting: one wait per batch
        torch.cuda.current_stream(device).synchronize()
    return out


def _host(x: torch.Tensor) -> np.ndarray:
    """``x`` on the host as numpy; from CUDA a non-blocking copy into pinned memory, valid once the stream
    is synchronised (``prediction_stats_padded`` does it once, before returning)."""
    return x.to("cpu", non_blocking=True).numpy()


def _last_routes(states: list, graphs: list[Graph], taus) -> list[tuple[dict, dict]]:
    """Each sequence's last-position route at every tau, found in one pass over their graphs side by side;
    the other positions' lists are empty."""
    merged, offsets = merge(graphs)
    L, H, B = merged.L, merged.H, len(states)
    last = torch.tensor([o + st.T - 1 for o, st in zip(offsets, states)], device=merged.ffn.device)
    out = [({}, {}) for _ in states]
    for tau in taus:
        head_keys, ffn_keys = routes_of(merged, tau, last)
        for kind, keys, width in ((0, head_keys, L * H), (1, ffn_keys, L)):
            for b, route in enumerate(split_keys(keys, width, B)):
                T = states[b].T
                out[b][kind][tau] = [np.zeros(0, dtype=np.int64)] * (T - 1) + [route]
    return out


def _blocks(spans: list, H: int, budget: int, backend: str) -> list[tuple[int, int]]:
    """Batch rows ``first .. stop - 1`` whose importances one call computes, per layer.

    On the CPU kernel, consecutive whole sequences that start at position 0 (right padding) share one call
    on their padded grid while its ``[G, H, T, T]`` importances fit ``budget``: for short texts the calls'
    fixed costs, not the arithmetic, are most of the time. Every other sequence is a block of its own,
    in chunks of query rows.
    """
    out: list[tuple[int, int]] = []
    for b, (start, T) in enumerate(spans):
        if out and backend == "cpu" and start == 0:
            first, stop = out[-1]
            G, T_max = stop - first + 1, max(T, *(spans[k][1] for k in range(first, stop)))
            if spans[first][0] == 0 and G * H * T_max * T_max <= budget:
                out[-1] = (first, b + 1)
                continue
        out.append((b, b + 1))
    return out


def _add_layer(states: list, first: int, stop: int, spans: list, rec: LayerActivations, w_o, w_flat,
               backend: str, budget: int) -> None:
    """Fold layer ``rec.layer``'s importances of batch rows ``first .. stop - 1`` into their states.

    ``G = stop - first`` sequences with the same start (one sequence, or several at position 0) on a grid of
    ``T`` positions, the longest's; query rows in chunks of ``C`` within ``budget`` elements ``[G, H, C, T]``.
    """
    l, G, H = rec.layer, stop - first, states[first].H
    start, T = spans[first][0], max(spans[b][1] for b in range(first, stop))
    bs, rows = slice(first, stop), slice(start, start + T)
    x = rec.inputs[bs, rows].float()  # [G, T, d]
    attn_out = rec.attn_out[bs, rows].float()
    out = rec.outputs[bs, rows].float()
    heads = head_outputs_of(rec.values[bs, :, rows], w_o, backend=backend, w_flat=w_flat)  # F [G, H, T, d]
    parallel = states[first].parallel
    if parallel:
        y, parts = out, torch.stack([x, out - x - attn_out])  # [G, T, d], [2, G, T, d]
    else:
        y = x + attn_out  # x^{lA}
        parts = x[None]  # [1, G, T, d]
    row_scale = rec.row_scale  # [B, T] post-attention norms' 1/r_pos, if any
    C = max(1, min(T, budget // max(1, G * H * T)))  # query rows per chunk
    scratch = torch.empty(G * H * C * T, dtype=torch.float32, device=y.device)
    for p0 in range(0, T, C):
        p1 = min(T, p0 + C)
        if G == 1:
            probs = rec.prob_rows(first, start, p0, p1)[None]  # [1, H, c, p1]
        else:
            probs = rec.probs[bs, :, p0:p1, :p1]  # [G, H, c, p1], every row starting at position 0
        if row_scale is not None:
            probs = probs * row_scale[bs, start + p0 : start + p1][:, None, :, None]
        dest = scratch[: G * H * (p1 - p0) * p1].view(G, H, p1 - p0, p1)
        if backend == "cpu":
            sub = sub_edge_block(y[:, p0:p1], probs, heads, p0, out=dest)
            direct = finish_block(sub, y[:, p0:p1], parts[:, :, p0:p1], p0).direct  # [K, G, c]
        else:  # one sequence
            one = HeadOutputs(heads.values[0], heads.w_o, heads.w_flat, heads.F[0], heads.f_max[0])
            sub = sub_edge_rows(y[0, p0:p1], probs[0], one, p0, backend=backend, out=dest[0])[None]
            direct = finish_rows(sub[0], y[0, p0:p1], parts[:, 0, p0:p1], p0, backend=backend).direct[:, None]
        sums, hits = _block_hits(sub, p0, [spans[b][1] for b in range(first, stop)], l, states[first].tau_min)
        for g, b in enumerate(range(first, stop)):
            st, q1 = states[b], min(p1, spans[b][1])
            if q1 <= p0:
                continue
            st._reduce_rows(l, p0, q1, sub[g, :, : q1 - p0, :q1], sums[g, :, : q1 - p0], hits[g])
            st.attn_residual[l, p0:q1] = direct[0, g, : q1 - p0]
            if parallel:
                st.ffn[l, p0:q1] = direct[1, g, : q1 - p0]
    if not parallel:
        block = direct_node(out.reshape(G * T, -1), torch.stack([y, out - y]).reshape(2, G * T, -1), backend=backend)
        direct = block.direct.view(2, G, T)
        for g, b in enumerate(range(first, stop)):
            st = states[b]
            st.ffn_residual[l], st.ffn[l] = direct[:, g, : st.T]


def _block_hits(imp: torch.Tensor, p0: int, lengths: list[int], layer: int, tau_min: float):
    """A block's importances ``[G, H, C, J]`` (rows p0..): each head's sum per row ``[G, H, C]``, and per
    sequence its sub-edges above ``tau_min`` (at most ~1/tau_min per node) as ``([n, 4] (layer, head, pos, j),
    [n] values)``, rows past a sequence's length (padding) left out."""
    hit = torch.nonzero(imp > tau_min)  # [N, 4] (g, h, row, j)
    values = imp[hit[:, 0], hit[:, 1], hit[:, 2], hit[:, 3]]
    if len(lengths) > 1:  # rows past a sequence's end are padding
        real = hit[:, 2] + p0 < torch.tensor(lengths, device=hit.device)[hit[:, 0]]
        hit, values = hit[real], values[real]
        counts = torch.bincount(hit[:, 0], minlength=len(lengths)).tolist()
    else:
        counts = [hit.shape[0]]
    hit[:, 0] = layer
    hit[:, 2] += p0
    return imp.sum(-1), list(zip(hit.split(counts), values.split(counts)))


class _Sequence:
    """One sequence's running reductions, on the device, filled layer by layer."""

    def __init__(self, L: int, H: int, T: int, parallel: bool, tau_min: float, device, words, source=None):
        self.L, self.H, self.T, self.parallel, self.tau_min = L, H, T, parallel, tau_min
        zeros = dict(dtype=torch.float32, device=device)
        self.head_sum = torch.zeros(L, H, T, **zeros)  # sum_j e^h_{pos,j}
        self.attn_residual = torch.zeros(L, T, **zeros)
        self.ffn = torch.zeros(L, T, **zeros)
        self.ffn_residual = None if parallel else torch.zeros(L, T, **zeros)
        self.hits: list[tuple[torch.Tensor, torch.Tensor]] = []  # ([n, 4] (layer, head, pos, j), [n] values)
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

    def _reduce_rows(self, l: int, p0: int, p1: int, imp: torch.Tensor, head_sum: torch.Tensor, hits) -> None:
        """Fold a chunk's importances ``[H, C, p1]`` (rows p0..p1-1), their row sums ``[H, C]`` and their
        sub-edges above tau_min (``_block_hits``) into the running statistics."""
        H, C, J = imp.shape
        self.head_sum[l, :, p0:p1] = head_sum
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
        self.hits.append(hits)

    def graph(self) -> Graph:
        hit = torch.cat([h for h, _ in self.hits])
        values = torch.cat([v for _, v in self.hits])
        return Graph(self.L, self.H, self.T, self.parallel, hit, values, self.attn_residual, self.ffn, self.ffn_residual)

    def pruned_heads(self, graph: Graph, tau: float, active_above: float) -> list[np.ndarray]:
        """Per position, the flat heads whose importance at its own attention node, after every part <= tau
        is dropped and the kept parts are rescaled to sum to 1, exceeds ``active_above``."""
        L, H, T = self.L, self.H, self.T
        kept_heads = torch.zeros(L, H, T, dtype=torch.float32, device=self.head_sum.device)
        keep = graph.values > tau
        kept = graph.hit[keep]
        kept_heads.index_put_((kept[:, 0], kept[:, 1], kept[:, 2]), graph.values[keep], accumulate=True)
        node = kept_heads.sum(1) + self.attn_residual * (self.attn_residual > tau)  # [L, T] kept parts
        if self.parallel:  # the FFN is a part of the same node
            node = node + self.ffn * (self.ffn > tau)
        pruned = kept_heads / torch.where(node > 0, node, 1.0)[:, None, :]
        lhp = torch.nonzero(pruned > active_above)  # [k, 3] (layer, head, pos)
        keys = torch.sort(lhp[:, 2] * (L * H) + lhp[:, 0] * H + lhp[:, 1]).values
        return split_keys(keys, L * H, T)

    def finish(self, taus, token_ids, predicted, name: str, graph: Graph, active_above: float | None = 0.0,
               routes: tuple[dict, dict] | None = None) -> PredictionStats:
        """The statistics on the host, from this sequence's ``graph()``; ``routes``: the (heads, FFNs) route
        lists per tau when the caller found them already (the last position's, ``_last_routes``), else every
        position's, found here."""
        L, H, T = self.L, self.H, self.T
        heads = self.head_sum.permute(2, 0, 1).reshape(T, L * H)  # [T, L*H]
        components = torch.cat([heads, self.ffn.T], dim=1)  # [T, L*H + L]
        if routes is None:
            routes = ({}, {})
            for tau in taus:
                head_keys, ffn_keys = routes_of(graph, tau)
                routes[0][tau] = split_keys(head_keys, L * H, T)
                routes[1][tau] = split_keys(ffn_keys, L, T)
        route_heads, route_ffn = routes
        prev = same = None
        if self.prev is not None:
            total = self.head_sum
            nan = torch.tensor(float("nan"), device=total.device)
            ok = total > 0
            prev = torch.where(ok, self.prev / torch.where(ok, total, 1.0), nan)
            prev[:, :, 0] = float("nan")
            ok_same = ok & (~self.first & (self.word_index >= 0))[None, None, :]  # later subwords only
            same = torch.where(ok_same, self.same / torch.where(ok, total, 1.0), nan)
            prev = _host(prev.permute(2, 0, 1).reshape(T, L * H))
            same = _host(same.permute(2, 0, 1).reshape(T, L * H))
        return PredictionStats(
            taus=tuple(taus), n_layers=L, n_heads=H, parallel=self.parallel,
            token_ids=_host(token_ids.to(torch.int64, copy=True)), predicted_ids=_host(predicted.to(torch.int64, copy=True)),
            components=_host(components), route_heads=route_heads, route_ffn=route_ffn,
            prev_share=prev, same_word_share=same,
            pruned_heads={} if active_above is None else {tau: self.pruned_heads(graph, tau, active_above)
                                                          for tau in taus},
            source_edges=None if self.source_edges is None else _host(self.source_edges.reshape(L * H)),
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


PREDICTIONS = ("all", "last")  # prediction_stats(predictions=): the positions whose routes and top-1 are found
# Elements of one [H, C, T] chunk on GPUs (256 MiB of float32): Llama-2-7B at 2k tokens in one chunk.
GPU_ELEMENT_BUDGET = 1 << 26
