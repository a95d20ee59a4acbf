"""Streamed, sparse, device-resident prediction statistics: what the corpus job records per prediction.

``prediction_stats`` gives, for every position of a sequence, exactly what the dense path
(``edge_importances`` -> ``component_importance()``, ``tables.head_shares`` and ``routes.route_masks``)
gives, without ever forming the ``[L, H, T, T]`` result. While the capture visits a layer, a kernel
(``flowray.kernels``) computes its sub-edge importances one block of query rows at a time (``[G, H, C, T]``;
on GPUs the whole padded batch at once) and reduces them at once, on the model's device
(``flowray.batch_stats``), to

- each head's summed importance per position (the section 4 component vector),
- each head's importance on the previous token and on earlier subwords of the same word,
- the sparse set of sub-edges above the smallest tau, in per-node slots: a node's importances sum to 1, so
  at most ``floor(1 / tau_min)`` of its parts exceed ``tau_min`` (an overflow is detected and redone).

After the last layer every position's route at every tau is extracted top-down over that sparse graph
(appendix B.2; the same rules as ``extract_route`` and ``route_masks``) as sorted integer pairs on the
device. Only the ``O(T * (L*H + L))`` numbers and the route index lists go to the host, and the host
waits for the device only then. Peak extra memory is one layer's head outputs plus one block: linear in
``T`` for a bounded block.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.profiler import record_function

from flowray.api import _unpack, pad_sequences, padded_forward_inputs
from flowray.batch_stats import BatchState, add_layer, batched_routes_fit, pruned_all, routes_all, span_tensors
from flowray.capture import LayerActivations, capture_layers, predicted_ids
from flowray.errors import InputError
from flowray.kernels import KernelConfig, select_kernel
from flowray.kernels.base import flat_output_projection
from flowray.models.modes import eval_mode
from flowray.sparse_routes import Graph, merge, routes_of, split_keys


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
        backend: the importance kernel (``"auto"``, ``"cpu"``, ``"torch"``, ``"triton"``; see ``flowray.kernels``).
        element_budget: elements of one block of importances ``[G, H, C, T]``; sets ``C`` (None:
            ``KernelConfig``'s: 4M on the CPU, where blocks stay in cache, 256M on GPUs, where fewer and
            larger kernels win).
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
    kernel_config: KernelConfig | None = None,
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
                                   element_budget=element_budget, kernel_config=kernel_config)


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
    kernel_config: KernelConfig | None = None,
) -> list[PredictionStats]:
    """``prediction_stats`` for a padded batch ``[B, T]`` with its attention mask (left or right padding).

    ``kernel_config``: budgets and tile choices of the kernels (``element_budget`` overrides its own).
    """
    hf_model, adapter, _, name = _unpack(model)
    taus = check_taus(taus)
    device = next(hf_model.parameters()).device
    if element_budget is not None and (isinstance(element_budget, bool) or not isinstance(element_budget, int)
                                       or element_budget < 1):
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
    config = kernel_config or KernelConfig()
    if element_budget is not None:
        config = replace(config, element_budget=element_budget)
    kernel = select_kernel(backend, device, config)
    s = adapter.shape
    T_pad = input_ids.shape[1]
    # the phases are named for profiles (torch.profiler, bench/gpu_job.py --profile): ~6 us each without one
    while True:
        state = BatchState(s.n_layers, s.n_heads, spans, T_pad, s.parallel, min(taus), device, words, sources,
                           config.hits_per_node)
        with record_function("flowray.forward"):
            predicted = _stream(hf_model, adapter, kernel, state, spans, forward_kwargs, input_ids.shape, predictions)
        with record_function("flowray.overflow"):
            most = state.overflow()  # the one read of the device before the routes
        if not most:
            break
        config = replace(config, hits_per_node=most)  # more parts above tau at a node than slots: redo
        kernel = select_kernel(backend, device, config)
    with record_function("flowray.routes"):
        batched = predictions == "all" and batched_routes_fit(state)
        hits = state.hits()  # the slots in use, read once for every pass below
        graphs = [None] * len(spans) if batched else state.graphs(hits)  # sparse graphs for the other route passes
        if predictions == "last":
            routes = _last_routes(graphs, taus)
        elif batched:  # every sequence's routes side by side on the padded grid
            routes = [({}, {}) for _ in spans]
            for tau, (heads_b, ffn_b) in routes_all(state, taus, hits).items():
                for b, (heads, ffn) in enumerate(zip(heads_b, ffn_b)):
                    routes[b][0][tau], routes[b][1][tau] = heads, ffn
        else:
            routes = [None] * len(spans)
    pruned = [{} for _ in spans]
    if active_above is not None:
        with record_function("flowray.pruned"):
            for tau in taus:
                for b, lists in enumerate(pruned_all(state, tau, active_above, hits)):
                    pruned[b][tau] = lists
    with record_function("flowray.finish"):
        out = [_finish(state, b, taus, input_ids[b, start : start + T], predicted[b, start : start + T], name,
                       graphs[b], pruned[b], routes[b]) for b, (start, T) in enumerate(spans)]
        if device.type == "cuda":  # _finish's host copies were started without waiting: one wait for them all
            torch.cuda.current_stream(device).synchronize()
    return out


def _host(x: torch.Tensor) -> np.ndarray:
    """``x`` on the host as numpy; from CUDA a non-blocking copy into pinned memory, valid once the stream
    is synchronised (``prediction_stats_padded`` does it once, before returning)."""
    return x.to("cpu", non_blocking=True).numpy()


def _stream(hf_model, adapter, kernel, state: BatchState, spans, forward_kwargs, shape, predictions: str):
    """One forward pass under capture; every layer folded into ``state``. Returns the top-1 ids ``[B, T]``."""
    budget = kernel.config.budget(state.head_sum.device)
    plan = kernel.plan(spans, state.H, budget)
    layers = adapter.layers()
    spans_on_device = span_tensors(spans, state.head_sum.device) if kernel.whole_batch else None

    def consume(rec: LayerActivations) -> None:
        w_o, _bias = adapter.output_projection(layers[rec.layer])  # the bias is in the node, in no edge
        w_o = w_o.detach()
        with record_function("flowray.layer"):
            w_flat = flat_output_projection(w_o)  # [d, H * dh], once per layer for every block
            for block in plan:
                add_layer(kernel, state, rec, block, w_o, w_flat, budget, spans_on_device)

    top: list[torch.Tensor] = []
    last = None if predictions == "all" else [start + T - 1 for start, T in spans]
    keep = budget if kernel.whole_batch else None  # whole-batch kernels read a layer's weights in one block
    with eval_mode(hf_model), capture_layers(hf_model, adapter, consume, rows=True, reuse_probs=True,
                                             keep_up_to=keep), predicted_ids(hf_model, top, positions=last):
        hf_model(**forward_kwargs)
    if last is None:
        return top[0]  # [B, T_pad] on the device
    predicted = torch.full(shape, -1, dtype=torch.long, device=top[0].device)  # -1 except at the last positions
    predicted[torch.arange(len(last), device=predicted.device), torch.tensor(last, device=predicted.device)] = top[0]
    return predicted


def _last_routes(graphs: list[Graph], taus) -> list[tuple[dict, dict]]:
    """Each sequence's last-position route at every tau, found in one pass over their graphs side by side;
    the other positions' lists are empty."""
    merged, offsets = merge(graphs)
    L, H, B = merged.L, merged.H, len(graphs)
    last = torch.tensor([o + g.T - 1 for o, g in zip(offsets, graphs)], device=merged.ffn.device)
    out = [({}, {}) for _ in graphs]
    for tau in taus:
        head_keys, ffn_keys = routes_of(merged, tau, last)
        for kind, keys, width in ((0, head_keys, L * H), (1, ffn_keys, L)):
            for b, route in enumerate(split_keys(keys, width, B)):
                T = graphs[b].T
                out[b][kind][tau] = [np.zeros(0, dtype=np.int64)] * (T - 1) + [route]
    return out


def _finish(state: BatchState, b: int, taus, token_ids, predicted, name: str, graph: Graph, pruned: dict,
            routes: tuple[dict, dict] | None) -> PredictionStats:
    """Sequence ``b``'s statistics on the host; ``routes``: the (heads, FFNs) route lists per tau when the
    caller found them already (the last position's, ``_last_routes``), else every position's, found here."""
    L, H = state.L, state.H
    start, T = state.spans[b]
    rows = slice(start, start + T)
    head_sum = state.head_sum[:, b, :, rows]  # [L, H, T]
    heads = head_sum.permute(2, 0, 1).reshape(T, L * H)  # [T, L*H]
    components = torch.cat([heads, state.ffn[:, b, rows].T], dim=1)  # [T, L*H + L]
    if routes is None:
        routes = ({}, {})
        for tau in taus:
            head_keys, ffn_keys = routes_of(graph, tau)
            routes[0][tau] = split_keys(head_keys, L * H, T)
            routes[1][tau] = split_keys(ffn_keys, L, T)
    route_heads, route_ffn = routes
    prev = same = None
    if state.prev is not None:
        ok = head_sum > 0
        safe = torch.where(ok, head_sum, 1.0)
        nan = torch.tensor(float("nan"), device=head_sum.device)
        prev = torch.where(ok, state.prev[:, b, :, rows] / safe, nan)
        prev[:, :, 0] = float("nan")
        later = ~state.first[b, rows] & (state.words[b, rows] >= 0)  # later subwords only
        same = torch.where(ok & later[None, None, :], state.same[:, b, :, rows] / safe, nan)
        prev = _host(prev.permute(2, 0, 1).reshape(T, L * H))
        same = _host(same.permute(2, 0, 1).reshape(T, L * H))
    source = None
    if state.source is not None and int(state.query[b]) >= 0:
        source = _host(state.source[:, b].reshape(L * H))
    return PredictionStats(
        taus=tuple(taus), n_layers=L, n_heads=H, parallel=state.parallel,
        token_ids=_host(token_ids.to(torch.int64, copy=True)), predicted_ids=_host(predicted.to(torch.int64, copy=True)),
        components=_host(components), route_heads=route_heads, route_ffn=route_ffn,
        prev_share=prev, same_word_share=same,
        pruned_heads=pruned,
        source_edges=source, meta={"model": name},
    )


PREDICTIONS = ("all", "last")  # prediction_stats(predictions=): the positions whose routes and top-1 are found
