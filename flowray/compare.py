"""Information flow routes vs patching baselines on IOI: how fast, how much agreement, how faithful.

``run_comparison`` measures, in one process with the model loaded once:

(a) routes: ``edge_importances`` + ``extract_route`` (last position) for every prompt, one prompt at a time;
(b) per-head activation patching from the contrastive (ABC) twin, every head of every layer;
(c) attention knockout of every token pair ``j < i`` (all heads, all layers, no renormalisation);

then compares what they find (head rankings; token-to-token connections) and ablates the heads the routes
rank highest against random heads (faithfulness). It writes ``report.md``, ``summary.json``, the raw arrays
(``arrays.npz``) and PNG figures to ``out_dir``.

Definitions (all in the report too):

- logit difference ``LD = logit(answer) - logit(wrong)`` at the last position (IOI: IO minus subject);
- patching effect of head (l, h): ``mean_p(LD_clean - LD_patched) / mean_p(LD_clean - LD_corrupt)``;
- activation frequency of a head: the fraction of prompts whose last-position route at ``tau`` has at least
  one sub-edge through it (paper section 3.1); contrastive frequency difference: on the prompts minus on
  their twins;
- route flow: the route's edge importances are local (renormalised at each node), so each node gets a
  weight: 1 at the top, and every edge passes ``weight(upper node) * importance`` down to its lower node.
  Token-to-token route strength of (i, j) = the flow of all attention edges j -> i, summed over layers
  (knockout removes j -> i in every layer at once); a head's flow = the flow through its sub-edges;
- knockout strength of (i, j) = ``LD_clean - LD_knocked``; rankings use its absolute value;
- faithfulness: heads' outputs mean-ablated (per position, over ABC twins of the same template and length),
  ``LD retained = mean_p(LD_ablated) / mean_p(LD_clean)``.

Importing this module is cheap (torch and transformers load inside the functions), so ``flowray --help``
stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowray.cli import positive_int, tau_arg  # the CLI's own argument types
from flowray.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_KS = (1, 2, 5, 10, 20, 40)
ABLATIONS = ("mean", "zero")


# --- small numeric helpers (numpy only) ---------------------------------------------------------------
def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties get their average rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sorted_x = x[order]
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0  # average of ranks s+1 .. e
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise InputError(f"spearman needs two arrays of one length; got {a.shape} and {b.shape}")
    if len(a) < 2:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def top_k(values: np.ndarray, k: int, *, positive_only: bool = False) -> set[int]:
    """Indices of the k largest values (ties broken by index); ``positive_only`` drops values <= 0."""
    values = np.asarray(values, dtype=float).ravel()
    order = np.argsort(-values, kind="mergesort")[:k]
    return {int(i) for i in order if not positive_only or values[i] > 0}


class Stopwatch:
    """Accumulates wall-clock and process CPU seconds (all threads) over ``with watch:`` blocks.

    CPU time is the steadier measure on a shared machine: other processes stretch the wall clock of whatever
    phase they overlap, but not (much) the work this process does.
    """

    def __init__(self):
        self.wall = 0.0
        self.cpu = 0.0

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu
        return False


def _mean_sd(xs) -> tuple[float, float]:
    xs = np.asarray([x for x in xs if np.isfinite(x)], dtype=float)
    if xs.size == 0:
        return float("nan"), float("nan")
    return float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else 0.0


# --- routes: frequencies and flows ---------------------------------------------------------------------
def route_flows(route, n_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flow through a route (top node = 1): ``(head_flow [L, H], pair_flow [T, T], pair_importance [T, T])``.

    ``pair_*[i, j]`` (query i, source j != i) sums the route's attention edges j -> i over layers:
    ``pair_flow`` their flow, ``pair_importance`` their raw (locally renormalised) importance.
    """
    from flowray.routes import EdgeKind, NodeKind

    def level(node) -> int:
        if node.kind is NodeKind.EMBED:
            return 0
        return 2 * node.layer + (1 if node.kind is NodeKind.ATTN else 2)

    weight = defaultdict(float)
    weight[route.top] = 1.0
    head_flow = np.zeros((route.n_layers, route.n_heads))
    pair_flow = np.zeros((n_tokens, n_tokens))
    pair_imp = np.zeros((n_tokens, n_tokens))
    # upper nodes first, so a node's weight is complete before its own edges pass it on
    for e in sorted(route.edges, key=lambda e: -level(e.target)):
        flow = weight[e.target] * e.importance
        weight[e.source] += flow
        if e.kind is EdgeKind.ATTENTION:
            for h in e.heads:
                head_flow[e.target.layer, h.head] += weight[e.target] * h.importance
            i, j = e.target.position, e.source.position
            if i != j:
                pair_flow[i, j] += flow
                pair_imp[i, j] += e.importance
    return head_flow, pair_flow, pair_imp


@dataclass
class _RouteStats:
    freq: np.ndarray  # [L, H] activation frequency over prompts
    flow: np.ndarray  # [L, H] mean head flow
    pair_flow: list  # per prompt [T, T]
    pair_imp: list  # per prompt [T, T]
    n_heads_in_route: list  # per prompt


def _route(lm, ids, tau: float):
    """``(route, T)``: the last-position route of one ``[T]`` prompt (edge_importances + extract_route)."""
    from flowray.api import edge_importances
    from flowray.routes import extract_route

    return extract_route(edge_importances(lm, ids[None]), tau=tau, position=-1), int(ids.shape[0])


def _routes_batched(lm, ids_list, tau: float) -> list:
    """The same routes for several prompts from one ``edge_importances_batch`` call."""
    from flowray.api import edge_importances_batch
    from flowray.routes import extract_route

    return [extract_route(imp, tau=tau, position=-1) for imp in edge_importances_batch(lm, [i[None] for i in ids_list])]


def _route_stats(routes, n_layers: int, n_heads: int) -> _RouteStats:
    """Frequencies and flows of ``(route, T)`` pairs."""
    freq = np.zeros((n_layers, n_heads))
    flow = np.zeros((n_layers, n_heads))
    pair_flow, pair_imp, n_in_route = [], [], []
    for route, T in routes:
        for l, h in route.heads():
            freq[l, h] += 1
        hf, pf, pi = route_flows(route, T)
        flow += hf
        pair_flow.append(pf)
        pair_imp.append(pi)
        n_in_route.append(len(route.heads()))
    n = max(len(routes), 1)
    return _RouteStats(freq / n, flow / n, pair_flow, pair_imp, n_in_route)


def rank_heads(primary: np.ndarray, secondary: np.ndarray | None = None) -> list[tuple[int, int]]:
    """All (layer, head) by ``primary`` descending, ties by ``secondary`` descending, then by index."""
    L, H = primary.shape
    sec = np.zeros_like(primary) if secondary is None else secondary
    order = np.lexsort((np.arange(L * H), -sec.ravel(), -primary.ravel()))
    return [(int(i) // H, int(i) % H) for i in order]


# --- prompts -------------------------------------------------------------------------------------------
@dataclass
class _Item:
    prompt: object  # flowray.tasks.TaskPrompt
    clean: object  # torch LongTensor [T]
    corrupt: object  # torch LongTensor [T]
    answer_id: int
    wrong_id: int


def _continuation_id(tokenizer, text: str, piece: str) -> int | None:
    head = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer(text + piece, add_special_tokens=False)["input_ids"]
    if full[: len(head)] != head or len(full) != len(head) + 1:
        return None
    return int(full[-1])


def _prepare(prompts, tokenizer) -> tuple[list[_Item], list[str]]:
    """Tokenise prompts and twins; drop (and say why) those the baselines cannot use."""
    items, dropped = [], []
    for p in prompts:
        clean = tokenizer(p.text, return_tensors="pt").input_ids[0]
        corrupt = tokenizer(p.contrastive, return_tensors="pt").input_ids[0]
        a = p.meta.get("answer_token_id") if isinstance(p.meta, dict) else None
        w = p.meta.get("wrong_token_id") if isinstance(p.meta, dict) else None
        a = a if a is not None else _continuation_id(tokenizer, p.text, p.answer)
        w = w if w is not None else _continuation_id(tokenizer, p.text, p.wrong)
        if clean.shape != corrupt.shape:
            dropped.append(f"{p.text!r}: twin has {corrupt.shape[0]} tokens, prompt {clean.shape[0]}")
        elif a is None or w is None or a == w:
            dropped.append(f"{p.text!r}: answer {p.answer!r} / wrong {p.wrong!r} are not two single tokens")
        else:
            items.append(_Item(p, clean, corrupt, int(a), int(w)))
    return items, dropped


def _groups(keys) -> dict:
    """key -> list of indices, in first-seen order."""
    out: dict = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return out


# --- the comparison ------------------------------------------------------------------------------------
def run_comparison(
    model="smollm2",
    n: int = 50,
    seed: int = 0,
    out_dir: str | Path = "compare-out",
    tau: float = 0.03,
    ks=DEFAULT_KS,
    random_draws: int = 5,
    progress: bool = True,
    *,
    top: int = 10,
    pair_k: int = 5,
    batch_size: int = 128,
    route_batch: int = 8,
    ablation: str = "mean",
    reference_n: int | None = None,
    templates: str = "both",
    device: str = "auto",
    prompts=None,
    command: str | None = None,
) -> dict:
    """Measure routes vs activation patching vs attention knockout on ``n`` IOI prompts; write a report.

    Args:
        model: a model spec for ``flowray.load_model`` (default: the packaged SmolLM2) or a ``LoadedModel``.
        n, seed, templates: the IOI batch (``flowray.tasks.ioi_prompts``); ignored when ``prompts`` is given.
        tau: route threshold (paper figure 6: 0.03).
        ks: numbers of heads to ablate for the faithfulness curve.
        random_draws: random head sets per k.
        top: head top-k for the ranking overlap; pair_k: token-pair top-k per prompt.
        batch_size: rows per forward pass in the patching / knockout / ablation sweeps.
        route_batch: prompts per ``edge_importances_batch`` call for the batched routes timing; also the
            chunk of prompts after which the measurement moves on to the next method (interleaving).
        ablation: "mean" (per position over ABC twins of the same template and length) or "zero".
        reference_n: extra IOI prompts whose ABC twins join the mean-ablation reference (default 4 n).
        prompts: TaskPrompt-like records (text, contrastive, answer, wrong, template, meta) to use instead.
        command: the command line to print in the report (default: this call, spelled out).

    Returns:
        the summary dict also written to ``out_dir/summary.json``.
    """
    import torch

    from flowray import baselines as bl
    from flowray.models.loading import LoadedModel, load_model
    from flowray.routes import check_tau

    tau = check_tau(tau)
    if ablation not in ABLATIONS:
        raise InputError(f"ablation must be one of {ABLATIONS}; got {ablation!r}")
    for name, value in (("random_draws", random_draws), ("top", top), ("pair_k", pair_k), ("batch_size", batch_size),
                        ("route_batch", route_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer; got {value!r}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise InputError(f"ks must be positive numbers of heads; got {ks!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if command is None:
        command = (f"python -c \"from flowray.compare import run_comparison; run_comparison(model={_model_label(model)!r}, "
                   f"n={n}, seed={seed}, out_dir={str(out_dir)!r}, tau={tau}, ks={tuple(ks)}, "
                   f"random_draws={random_draws}, batch_size={batch_size}, ablation={ablation!r})\"")

    load_start = _load_average()
    t0 = time.perf_counter()
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    load_seconds = time.perf_counter() - t0
    hf, adapter, tok = lm.model, lm.adapter, lm.tokenizer
    s = adapter.shape
    if ks[0] > s.n_layers * s.n_heads:
        raise InputError(f"ks must include a number of heads <= {s.n_layers * s.n_heads} (the model's heads); got {ks!r}")
    ks = [k for k in ks if k <= s.n_layers * s.n_heads]  # larger k cannot be ablated

    # ---- prompts
    if prompts is None:
        from flowray.tasks import ioi_prompts

        prompts = ioi_prompts(n, seed=seed, tokenizer=tok, templates=templates)
    items, dropped = _prepare(prompts, tok)
    for why in dropped:
        log.warning("dropped prompt %s", why)
    if not items:
        raise InputError(f"none of the {len(prompts)} prompts is usable: {dropped[:3]}")
    P = len(items)
    answer = torch.tensor([it.answer_id for it in items])
    wrong = torch.tensor([it.wrong_id for it in items])
    by_length = _groups(int(it.clean.shape[0]) for it in items)  # T -> prompt indices

    def stack(idx, attr):
        return torch.stack([getattr(items[i], attr) for i in idx])

    _warm_up(lm, items[0], answer[:1], wrong[:1])
    # ---- (a) routes, (b) patching, (c) knockout: measured chunk by chunk, interleaved, so that other
    # processes slowing the machine for a while slow all methods alike instead of one phase
    phases = {name: Stopwatch() for name in ("routes", "routes_contrastive", "routes_batched", "patching", "knockout")}
    clean_routes, twin_routes, knock = [None] * P, [None] * P, [None] * P
    batched_freq = np.zeros((s.n_layers, s.n_heads))
    results, order, n_pairs = [], [], 0
    chunks = [(T, idx[c : c + route_batch]) for T, idx in by_length.items() for c in range(0, len(idx), route_batch)]
    for T, chunk in _bar_chunks(chunks, progress):
        for i in chunk:  # (a) one prompt at a time, the way a user runs flowray
            with phases["routes"]:
                clean_routes[i] = _route(lm, items[i].clean, tau)
        for i in chunk:  # (a') the twins, for the contrastive difference
            with phases["routes_contrastive"]:
                twin_routes[i] = _route(lm, items[i].corrupt, tau)
        with phases["routes_batched"]:  # (a_b) the prompts again, batched like the baselines
            for route in _routes_batched(lm, [items[i].clean for i in chunk], tau):
                for l, h in route.heads():
                    batched_freq[l, h] += 1 / P
        with phases["patching"]:  # (b)
            results.append(bl.patching_sweep(hf, adapter, stack(chunk, "clean"), stack(chunk, "corrupt"),
                                             answer[chunk], wrong[chunk], batch_size=batch_size, progress=progress))
        order += chunk
        with phases["knockout"]:  # (c)
            res = bl.knockout_sweep(hf, adapter, stack(chunk, "clean"), answer[chunk], wrong[chunk],
                                    batch_size=batch_size, progress=progress)
        for row, i in enumerate(chunk):
            knock[i] = (res.ld_clean[row], res.delta[row])
        n_pairs += len(chunk) * T * (T - 1) // 2
    clean_stats = _route_stats(clean_routes, s.n_layers, s.n_heads)
    twin_stats = _route_stats(twin_routes, s.n_layers, s.n_heads)
    patch = _reorder(bl.PatchingResult.concatenate(results), order)
    effect = patch.effect()  # [L, H]

    # ---- agreement: heads
    diff = clean_stats.freq - twin_stats.freq  # [L, H]
    diff_flow = clean_stats.flow - twin_stats.flow
    rank_flow_diff = rank_heads(diff, diff_flow)
    rank_flow_freq = rank_heads(clean_stats.freq, clean_stats.flow)
    rank_patch = rank_heads(effect)
    n_all = s.n_layers * s.n_heads
    top_eff = set(rank_patch[:top])
    heads_agreement = {
        "top": top,
        "chance_overlap": top * top / n_all,
        "overlap_diff_vs_patching": len(set(rank_flow_diff[:top]) & top_eff),
        "overlap_freq_vs_patching": len(set(rank_flow_freq[:top]) & top_eff),
        "spearman_diff_vs_patching": spearman(diff, effect),
        "spearman_freq_vs_patching": spearman(clean_stats.freq, effect),
        "spearman_diff_flow_vs_patching": spearman(diff_flow, effect),
        "spearman_abs_diff_vs_abs_patching": spearman(np.abs(diff), np.abs(effect)),
        "top_patching": [_head_row(h, effect, diff, clean_stats.freq) for h in rank_patch[:top]],
        "top_flow_diff": [_head_row(h, effect, diff, clean_stats.freq) for h in rank_flow_diff[:top]],
        "top_flow_freq": [_head_row(h, effect, diff, clean_stats.freq) for h in rank_flow_freq[:top]],
        "heads_with_freq_1": int((clean_stats.freq >= 1.0).sum()),
    }

    # ---- agreement: token-to-token connections, per prompt
    pair_rows = _pair_agreement(knock, clean_stats, pair_k)

    # ---- faithfulness: ablate top-k heads vs random heads
    with Stopwatch() as phases["faithfulness"]:
        faith = _faithfulness(lm, items, by_length, answer, wrong, patch.ld_clean, ks, random_draws, seed, ablation,
                              reference_n if reference_n is not None else 4 * P, templates, batch_size, progress,
                              {"routes: activation frequency": rank_flow_freq,
                               "routes: contrastive frequency difference": rank_flow_diff,
                               "patching effect": rank_patch})

    # ---- summary
    timing = {
        "load_model_s": load_seconds,
        "routes_batch": route_batch,
        "routes_batched_calls": len(chunks),
        "routes_batched_same_heads": bool(np.allclose(batched_freq, clean_stats.freq)),
        "patching_forward_passes": P * n_all,
        "knockout_forward_passes": n_pairs,
    }
    for name, watch in phases.items():
        timing[f"{name}_s"], timing[f"{name}_cpu_s"] = watch.wall, watch.cpu
    for suffix in ("s", "cpu_s"):
        kind = "" if suffix == "s" else "_cpu"
        routes, twins, batched = (timing[f"{n}_{suffix}"] for n in ("routes", "routes_contrastive", "routes_batched"))
        for method in ("patching", "knockout"):
            spent = timing[f"{method}_{suffix}"]
            timing[f"ratio{kind}_{method}_over_routes"] = spent / routes
            timing[f"ratio{kind}_{method}_over_routes_both"] = spent / (routes + twins)
            timing[f"ratio{kind}_{method}_over_routes_batched"] = spent / batched
    ld_clean, ld_corrupt = patch.ld_clean, patch.ld_corrupt
    summary = {
        "model": lm.name,
        "n_requested": len(prompts),
        "n_used": P,
        "dropped": dropped,
        "seed": seed,
        "tau": tau,
        "templates": templates,
        "token_lengths": sorted(int(T) for T in by_length),
        "batch_size": batch_size,
        "ablation": ablation,
        "command": command,
        "machine": {**_machine(hf), "load_average_start": load_start, "load_average_end": _load_average()},
        "task": {
            "ld_clean_mean": float(ld_clean.mean()),
            "ld_corrupt_mean": float(ld_corrupt.mean()),
            "accuracy_ld_positive": float((ld_clean > 0).mean()),
            "route_heads_mean": float(np.mean(clean_stats.n_heads_in_route)),
            "route_heads_contrastive_mean": float(np.mean(twin_stats.n_heads_in_route)),
        },
        "timing": timing,
        "heads": heads_agreement,
        "pairs": pair_rows,
        "faithfulness": faith,
    }
    arrays = {
        "patching_effect": effect,
        "patching_ld_patched": patch.ld_patched,
        "ld_clean": ld_clean,
        "ld_corrupt": ld_corrupt,
        "flow_freq": clean_stats.freq,
        "flow_freq_contrastive": twin_stats.freq,
        "flow_head_flow": clean_stats.flow,
        "flow_head_flow_contrastive": twin_stats.flow,
    }
    np.savez_compressed(out_dir / "arrays.npz", **arrays)
    figures = _figures(out_dir, effect, clean_stats.freq, diff, faith, knock, clean_stats, items, tok, top)
    summary["figures"] = figures
    (out_dir / "summary.json").write_text(json.dumps(_jsonable(summary), indent=1))
    report = out_dir / "report.md"
    report.write_text(_report(summary))
    summary["report"] = str(report)
    return summary


def _warm_up(lm, item, answer, wrong) -> None:
    """One untimed pass of each kind, so no method pays for first-call setup (lazy imports, allocator)."""
    from flowray import baselines as bl
    from flowray.api import edge_importances

    edge_importances(lm, item.clean[None])
    bl.patching_sweep(lm.model, lm.adapter, item.clean[None], item.corrupt[None], answer, wrong, batch_size=8)
    with bl.attention_knockout(lm.model, lm.adapter, [(0, 1, 0)]):
        bl.last_logits(lm.model, item.clean[None])


def _model_label(model) -> str:
    return model if isinstance(model, str) else getattr(model, "name", type(model).__name__)


def _bar_chunks(chunks: list, progress: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(c) for _, c in chunks), desc="routes + patching + knockout", unit="prompt",
               disable=not progress)
    try:
        for T, chunk in chunks:
            yield T, chunk
            bar.update(len(chunk))
    finally:
        bar.close()


def _reorder(res, order: list[int]):
    """Results concatenated in group order -> prompt order."""
    from flowray.baselines import PatchingResult

    inv = np.argsort(np.asarray(order))
    return PatchingResult(res.ld_clean[inv], res.ld_corrupt[inv], res.ld_patched[inv])


def _head_row(h, effect, diff, freq) -> dict:
    l, k = h
    return {"layer": l, "head": k, "patching_effect": float(effect[l, k]), "flow_diff": float(diff[l, k]),
            "flow_freq": float(freq[l, k])}


def _pair_agreement(knock, stats: _RouteStats, k: int) -> dict:
    """Per prompt: knockout |LD change| vs route strength over pairs j < i; averaged over prompts."""
    rows = defaultdict(list)
    for (ld0, delta), flow, imp in zip(knock, stats.pair_flow, stats.pair_imp):
        T = delta.shape[0]
        i, j = np.tril_indices(T, k=-1)
        kd = delta[i, j]
        for name, mask in (("all", np.ones_like(i, dtype=bool)), ("no_first", j > 0)):
            kabs, kd_m, fl, im = np.abs(kd[mask]), kd[mask], flow[i, j][mask], imp[i, j][mask]
            top_k_knock = top_k(kabs, k)
            top_k_route = top_k(fl, k, positive_only=True)
            rows[f"{name}/overlap"].append(len(top_k_knock & top_k_route) / k)
            rows[f"{name}/chance"].append(len(top_k_route) / max(len(kabs), 1))
            rows[f"{name}/spearman_flow"].append(spearman(kabs, fl))
            rows[f"{name}/spearman_importance"].append(spearman(kabs, im))
            rows[f"{name}/spearman_signed_flow"].append(spearman(kd_m, fl))
            rows[f"{name}/route_pairs"].append(int((fl > 0).sum()))
            rows[f"{name}/n_pairs"].append(int(mask.sum()))
            strongest = int(np.argmax(kabs))
            rows[f"{name}/strongest_knockout_source_is_first"].append(int(j[mask][strongest] == 0))
    out = {"k": k}
    for key, values in rows.items():
        mean, sd = _mean_sd(values)
        out[key] = {"mean": mean, "sd": sd, "n": int(np.isfinite(np.asarray(values, dtype=float)).sum())}
    return out


def _faithfulness(lm, items, by_length, answer, wrong, ld_clean, ks, draws, seed, ablation, reference_n,
                  templates, batch_size, progress, rankings: dict) -> dict:
    """LD retained when the top-k heads of each ranking, or k random heads, are ablated."""
    import torch
    from tqdm.auto import tqdm

    from flowray import baselines as bl

    hf, adapter, tok = lm.model, lm.adapter, lm.tokenizer
    s = adapter.shape
    rng = np.random.default_rng(seed)
    configs, labels = [], []  # labels: (curve name, k, draw)
    for name, ranking in rankings.items():
        for k in ks:
            mask = np.zeros((s.n_layers, s.n_heads), dtype=bool)
            for l, h in ranking[:k]:
                mask[l, h] = True
            configs.append(mask)
            labels.append((name, k, 0))
    for k in ks:
        for d in range(draws):
            mask = np.zeros(s.n_layers * s.n_heads, dtype=bool)
            mask[rng.choice(mask.size, size=k, replace=False)] = True
            configs.append(mask.reshape(s.n_layers, s.n_heads))
            labels.append(("random", k, d))
    masks = np.stack(configs)  # [C, L, H]

    # mean-ablation references: ABC twins grouped by (template, length)
    means_by_key = {}
    reference_sizes = []
    if ablation == "mean":
        refs = [it.corrupt for it in items]
        ref_keys = [(it.prompt.template, int(it.corrupt.shape[0])) for it in items]
        if reference_n > 0:
            try:
                from flowray.tasks import ioi_prompts

                extra, _ = _prepare(ioi_prompts(reference_n, seed=seed + 1_000_003, tokenizer=tok,
                                                templates=templates), tok)
            except InputError as exc:  # e.g. a tokenizer with few one-token names
                log.warning("no extra mean-ablation reference prompts: %s", exc)
                extra = []
            refs += [it.corrupt for it in extra]
            ref_keys += [(it.prompt.template, int(it.corrupt.shape[0])) for it in extra]
        for key, idx in tqdm(_groups(ref_keys).items(), desc="ablation means", disable=not progress, leave=False):
            means_by_key[key] = bl.head_means(hf, adapter, torch.stack([refs[i] for i in idx]))  # [L, T, H, dh]
            reference_sizes.append(len(idx))

    ld = np.zeros((masks.shape[0], len(items)))
    bar = tqdm(total=masks.shape[0] * len(items), desc="ablation", unit="fwd", disable=not progress)
    for T, idx in by_length.items():
        ids = torch.stack([items[i].clean for i in idx])
        means = None
        if ablation == "mean":
            means = torch.stack([means_by_key[(items[i].prompt.template, T)] for i in idx], dim=1)  # [L, P, T, H, dh]
        ld[:, idx] = bl.ablation_sweep(hf, adapter, ids, masks, answer[idx], wrong[idx], mode=ablation, means=means,
                                       batch_size=batch_size)
        bar.update(masks.shape[0] * len(idx))
    bar.close()
    base = float(np.mean(ld_clean))
    curves: dict = {}
    for (name, k, _d), row in zip(labels, ld):
        curves.setdefault(name, {}).setdefault(k, []).append(float(np.mean(row)) / base)
    out = {"ks": ks, "ablation": ablation, "ld_clean_mean": base, "random_draws": draws,
           "reference_group_sizes": {"min": int(min(reference_sizes)) if reference_sizes else 0,
                                     "median": float(np.median(reference_sizes)) if reference_sizes else 0.0,
                                     "groups": len(reference_sizes)},
           "curves": {}}
    for name, per_k in curves.items():
        out["curves"][name] = {str(k): dict(zip(("mean", "sd"), _mean_sd(v))) for k, v in per_k.items()}
    return out


def _machine(model) -> dict:
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = next(model.parameters()).device
    return {
        "device": str(dev) if dev.type != "cuda" else f"cuda ({torch.cuda.get_device_name(dev)})",
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def _load_average() -> float | None:
    """The 1-minute load average (other processes competing for the cores), where the OS reports it."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


# --- figures -------------------------------------------------------------------------------------------
def plot_faithfulness(faith: dict, ax=None):
    """LD retained vs number of ablated heads: one line per ranking, random as mean +- sd band."""
    from flowray.plots import _pyplot

    plt = _pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
    else:
        fig = ax.figure
    ks = faith["ks"]
    styles = {"random": {"color": "#888888", "ls": "--"}}
    for name, per_k in faith["curves"].items():
        mean = np.array([per_k[str(k)]["mean"] for k in ks])
        sd = np.array([per_k[str(k)]["sd"] for k in ks])
        label = name if name != "random" else f"random heads (mean +- sd, {faith['random_draws']} draws)"
        ax.plot(ks, mean, marker="o", label=label, **styles.get(name, {}))
        if name == "random":
            ax.fill_between(ks, mean - sd, mean + sd, color="#bbbbbb", alpha=0.4)
    ax.axhline(1.0, color="black", lw=0.6)
    ax.axhline(0.0, color="black", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel(f"heads {faith['ablation']}-ablated (k)")
    ax.set_ylabel("logit difference retained (ablated / clean)")
    ax.legend(fontsize=8)
    ax.set_title("Faithfulness: ablating the top-k heads of each ranking")
    return fig


def plot_head_grids(effect: np.ndarray, freq: np.ndarray, diff: np.ndarray, axes=None):
    """Three layer x head heatmaps: patching effect, route activation frequency, contrastive difference."""
    from flowray.plots import _pyplot

    plt = _pyplot()
    L, H = effect.shape
    if axes is None:
        fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.32 * L + 2), 3 * (0.3 * H + 1.2)))
    else:
        fig = axes[0].figure
    panels = [
        (effect, "activation patching effect (normalised LD drop)", "RdBu_r", True),
        (freq, "route activation frequency (prompts)", "Blues", False),
        (diff, "route frequency: prompts - ABC twins", "RdBu_r", True),
    ]
    for ax, (data, title, cmap, symmetric) in zip(axes, panels):
        vmax = float(np.abs(data).max()) or 1.0
        im = ax.imshow(data.T, aspect="auto", origin="lower", cmap=cmap,
                       vmin=-vmax if symmetric else 0.0, vmax=vmax if symmetric else max(vmax, 1e-9))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel("head")
        ax.set_xticks(range(0, L, max(1, L // 15)))
        ax.set_yticks(range(H))
        fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    return fig


def plot_effect_scatter(effect: np.ndarray, diff: np.ndarray, top: int = 10, ax=None):
    """Each head: patching effect (x) vs route frequency difference (y); top heads by patching labelled."""
    from flowray.plots import _pyplot

    plt = _pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.0, 4.6))
    else:
        fig = ax.figure
    H = effect.shape[1]
    ax.scatter(effect.ravel(), diff.ravel(), s=12, color="#3a6ea5", alpha=0.7)
    for idx in np.argsort(-effect.ravel())[:top]:
        ax.annotate(f"{idx // H}.{idx % H}", (effect.ravel()[idx], diff.ravel()[idx]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="black", lw=0.5)
    ax.axvline(0, color="black", lw=0.5)
    ax.set_xlabel("activation patching effect")
    ax.set_ylabel("route frequency difference (prompts - twins)")
    ax.set_title(f"Heads: patching vs flow (rho = {spearman(effect, diff):.2f})")
    return fig


def plot_pair_example(delta: np.ndarray, flow: np.ndarray, tokens: list[str], axes=None):
    """One prompt: knockout |LD change| and route flow per token pair (query i rows, source j columns)."""
    from flowray.plots import _pyplot

    plt = _pyplot()
    T = delta.shape[0]
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(2 * (0.35 * T + 2), 0.35 * T + 1.8))
    else:
        fig = axes[0].figure
    k = np.where(np.tril(np.ones((T, T), dtype=bool), -1), np.abs(np.nan_to_num(delta)), np.nan)
    r = np.where(np.tril(np.ones((T, T), dtype=bool), -1), flow, np.nan)
    for ax, data, title in ((axes[0], k, "knockout |LD change|"), (axes[1], r, "route flow (sum over layers)")):
        im = ax.imshow(data, cmap="Greens")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(T))
        ax.set_yticks(range(T))
        ax.set_xticklabels([repr(t)[1:-1] for t in tokens], rotation=90, fontsize=7)
        ax.set_yticklabels([repr(t)[1:-1] for t in tokens], fontsize=7)
        ax.set_xlabel("source j")
        ax.set_ylabel("query i")
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig


def _figures(out_dir: Path, effect, freq, diff, faith, knock, stats, items, tok, top) -> dict:
    from flowray.plots import _pyplot, save_figure

    plt = _pyplot()
    made = {}
    for name, make in (
        ("faithfulness.png", lambda: plot_faithfulness(faith)),
        ("heads_grid.png", lambda: plot_head_grids(effect, freq, diff)),
        ("heads_scatter.png", lambda: plot_effect_scatter(effect, diff, top)),
        ("pairs_example.png", lambda: plot_pair_example(
            knock[0][1], stats.pair_flow[0], [tok.decode([t]) for t in items[0].clean.tolist()])),
    ):
        fig = make()
        save_figure(fig, out_dir / name)
        plt.close(fig)
        made[name.removesuffix(".png")] = name
    return made


# --- report --------------------------------------------------------------------------------------------
def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def write_report(out_dir: str | Path) -> Path:
    """Render ``out_dir/report.md`` again from ``out_dir/summary.json`` (no model, nothing re-measured)."""
    out_dir = Path(out_dir)
    path = out_dir / "summary.json"
    if not path.is_file():
        raise InputError(f"{str(path)!r} does not exist; run run_comparison(out_dir=...) first")
    report = out_dir / "report.md"
    report.write_text(_report(json.loads(path.read_text())))
    return report


def _report(S: dict) -> str:
    t, h, p, fa, m, task = S["timing"], S["heads"], S["pairs"], S["faithfulness"], S["machine"], S["task"]
    top = h["top"]
    lines = [
        "# Information flow routes vs patching baselines (IOI)",
        "",
        f"Model `{S['model']}`, {S['n_used']} IOI prompts (of {S['n_requested']} asked for; seed {S['seed']}, "
        f"templates {S['templates']}, token lengths {S['token_lengths']}), route threshold tau = {S['tau']}.",
        "",
        "## Setup",
        "",
        "Command:",
        "",
        "```",
        S["command"],
        "```",
        "",
        f"Machine: {m['device']}, CPU `{m['cpu']}`, {m['cpu_count']} cores, torch threads {m['torch_threads']}; "
        f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}; {m['dtype']} weights, "
        f"attention `{m['attn_implementation']}` for the patching and ablation passes (routes run eager "
        "attention, knockout runs the model's eager attention through flowray's registered function). "
        f"1-minute load average {_f(m.get('load_average_start'), 1)} before the run and "
        f"{_f(m.get('load_average_end'), 1)} at its end (the run's own {m['torch_threads']} threads count; more "
        "means other processes shared the cores).",
        "",
        f"The task: mean logit difference LD = logit(IO) - logit(S) is {_f(task['ld_clean_mean'], 2)} on the "
        f"prompts and {_f(task['ld_corrupt_mean'], 2)} on their ABC twins; LD > 0 on "
        f"{100 * task['accuracy_ld_positive']:.0f}% of the prompts. A last-position route at tau = {S['tau']} "
        f"holds {_f(task['route_heads_mean'], 1)} heads on average ({_f(task['route_heads_contrastive_mean'], 1)} "
        "on the twins).",
    ]
    if S["dropped"]:
        lines += ["", f"Dropped prompts ({len(S['dropped'])}): " + "; ".join(S["dropped"][:5])]
    lines += [
        "",
        "## Time",
        "",
        "All measured in the same process, model loaded once "
        f"(loading took {_f(t['load_model_s'], 1)} s, not counted), after one untimed warm-up pass of each kind. "
        f"The methods take turns on chunks of at most {t['routes_batch']} prompts of one token length, so a busy "
        "spell of the machine slows them alike.",
        "",
        "Wall: wall-clock seconds. CPU: process CPU seconds over all threads (about threads x wall when the "
        "cores are free; steadier than wall when other processes share the machine).",
        "",
        "| what | forward passes | wall s | CPU s |",
        "| --- | ---: | ---: | ---: |",
        f"| (a) routes of the {S['n_used']} prompts (edge_importances + extract_route, one prompt at a time) | "
        f"{S['n_used']} | {_f(t['routes_s'], 2)} | {_f(t['routes_cpu_s'], 2)} |",
        f"| (a') routes of the {S['n_used']} ABC twins (needed for the contrastive difference) | {S['n_used']} | "
        f"{_f(t['routes_contrastive_s'], 2)} | {_f(t['routes_contrastive_cpu_s'], 2)} |",
        f"| (a_b) routes of the {S['n_used']} prompts, edge_importances_batch of up to {t['routes_batch']} prompts "
        f"(same heads as (a): {'yes' if t['routes_batched_same_heads'] else 'NO'}) | "
        f"{t['routes_batched_calls']} | {_f(t['routes_batched_s'], 2)} | {_f(t['routes_batched_cpu_s'], 2)} |",
        f"| (b) per-head activation patching, every head of every layer (batch {S['batch_size']}) | "
        f"{t['patching_forward_passes']} | {_f(t['patching_s'], 1)} | {_f(t['patching_cpu_s'], 1)} |",
        f"| (c) attention knockout of every token pair j < i (batch {S['batch_size']}) | "
        f"{t['knockout_forward_passes']} | {_f(t['knockout_s'], 1)} | {_f(t['knockout_cpu_s'], 1)} |",
        "",
        "| ratio | wall | CPU |",
        "| --- | ---: | ---: |",
        f"| (b) patching / (a) routes | **{_f(t['ratio_patching_over_routes'], 1)}x** | "
        f"**{_f(t['ratio_cpu_patching_over_routes'], 1)}x** |",
        f"| (c) knockout / (a) routes | **{_f(t['ratio_knockout_over_routes'], 1)}x** | "
        f"**{_f(t['ratio_cpu_knockout_over_routes'], 1)}x** |",
        f"| (b) patching / ((a) + (a')) routes of prompts and twins | {_f(t['ratio_patching_over_routes_both'], 1)}x | "
        f"{_f(t['ratio_cpu_patching_over_routes_both'], 1)}x |",
        f"| (c) knockout / ((a) + (a')) | {_f(t['ratio_knockout_over_routes_both'], 1)}x | "
        f"{_f(t['ratio_cpu_knockout_over_routes_both'], 1)}x |",
        f"| (b) patching / (a_b) batched routes | {_f(t['ratio_patching_over_routes_batched'], 1)}x | "
        f"{_f(t['ratio_cpu_patching_over_routes_batched'], 1)}x |",
        f"| (c) knockout / (a_b) batched routes | {_f(t['ratio_knockout_over_routes_batched'], 1)}x | "
        f"{_f(t['ratio_cpu_knockout_over_routes_batched'], 1)}x |",
        "",
        f"(The faithfulness ablations below took {_f(t['faithfulness_s'], 1)} s; they are an evaluation, not a "
        "method, and are not in the ratios.)",
        "",
        "## Agreement: heads",
        "",
        "Flow ranks heads by their contrastive activation frequency difference (frequency in the last-position "
        "routes of the prompts minus in the routes of their ABC twins; ties by the difference of mean route flow "
        "through the head). Patching ranks them by the normalised drop of the mean logit difference when the "
        "head's output is patched from the twin.",
        "",
        "| comparison | value |",
        "| --- | ---: |",
        f"| top-{top} overlap, flow difference vs patching | **{h['overlap_diff_vs_patching']} / {top}** "
        f"(chance {h['chance_overlap']:.2f}) |",
        f"| top-{top} overlap, plain flow frequency vs patching | {h['overlap_freq_vs_patching']} / {top} |",
        f"| Spearman, flow difference vs patching effect (all heads) | **{_f(h['spearman_diff_vs_patching'])}** |",
        f"| Spearman, flow-weighted difference vs patching effect | {_f(h['spearman_diff_flow_vs_patching'])} |",
        f"| Spearman, plain flow frequency vs patching effect | {_f(h['spearman_freq_vs_patching'])} |",
        f"| Spearman, abs(flow difference) vs abs(patching effect) | {_f(h['spearman_abs_diff_vs_abs_patching'])} |",
        f"| heads in every prompt's route (frequency 1) | {h['heads_with_freq_1']} |",
        "",
        f"Top {top} heads by patching effect vs by flow difference:",
        "",
        "| rank | patching: head | effect | its flow diff | flow: head | flow diff | its effect |",
        "| ---: | --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for r, (a, b) in enumerate(zip(h["top_patching"], h["top_flow_diff"]), 1):
        lines.append(
            f"| {r} | {a['layer']}.{a['head']} | {_f(a['patching_effect'])} | {_f(a['flow_diff'], 2)} | "
            f"{b['layer']}.{b['head']} | {_f(b['flow_diff'], 2)} | {_f(b['patching_effect'])} |"
        )
    k = p["k"]
    lines += [
        "",
        "## Agreement: token-to-token connections",
        "",
        "Knockout strength of (i, j): LD_clean - LD_knocked with the post-softmax weight i -> j zeroed in every "
        "head of every layer (no renormalisation); ranked by its absolute value. Route strength of (i, j): the "
        "flow of the route's attention edges j -> i summed over layers (flow = the top node's unit weight passed "
        "down through the locally renormalised edge importances). Computed per prompt over all pairs j < i, then "
        "averaged (mean +- sd over prompts). The route's top-k only counts pairs the route contains.",
        "",
        "| pairs | top-k overlap | chance | Spearman (flow) | Spearman (raw importance) | Spearman (signed knockout) | route pairs / all pairs | strongest knockout has j = 0 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, label in (("all", "all j < i"), ("no_first", "j >= 1 (first token excluded)")):
        def g(key, name=name):
            return p[f"{name}/{key}"]

        lines.append(
            f"| {label} | {_f(g('overlap')['mean'], 2)} +- {_f(g('overlap')['sd'], 2)} (k = {k}) | "
            f"{_f(g('chance')['mean'], 2)} | {_f(g('spearman_flow')['mean'], 2)} +- {_f(g('spearman_flow')['sd'], 2)} | "
            f"{_f(g('spearman_importance')['mean'], 2)} | {_f(g('spearman_signed_flow')['mean'], 2)} | "
            f"{_f(g('route_pairs')['mean'], 1)} / {_f(g('n_pairs')['mean'], 1)} | "
            f"{100 * g('strongest_knockout_source_is_first')['mean']:.0f}% |"
        )
    ks = fa["ks"]
    lines += [
        "",
        "## Faithfulness",
        "",
        f"The top-k heads of each ranking are {fa['ablation']}-ablated together"
        + (" (each head's output replaced, at every position, by its mean over ABC twins of the same template and "
           f"token length: {fa['reference_group_sizes']['groups']} groups, median size "
           f"{_f(fa['reference_group_sizes']['median'], 1)}, min {fa['reference_group_sizes']['min']})"
           if fa["ablation"] == "mean" else " (outputs set to zero)")
        + f"; k random heads are drawn {fa['random_draws']} times. LD retained = mean LD ablated / mean LD clean "
        f"(mean clean LD {_f(fa['ld_clean_mean'], 2)}). Lower = the heads matter more.",
        "",
        "| ranking | " + " | ".join(f"k = {k}" for k in ks) + " |",
        "| --- | " + " | ".join("---:" for _ in ks) + " |",
    ]
    for name, per_k in fa["curves"].items():
        cells = []
        for k in ks:
            c = per_k[str(k)]
            cells.append(_f(c["mean"]) + (f" +- {_f(c['sd'])}" if name == "random" else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Discussion", ""] + _discussion(S) + [
        "",
        "## Figures",
        "",
        "- `faithfulness.png`: LD retained vs k for each ranking and for random heads.",
        "- `heads_grid.png`: layer x head grids of the patching effect, the route activation frequency and the "
        "contrastive frequency difference.",
        "- `heads_scatter.png`: per head, patching effect vs route frequency difference.",
        "- `pairs_example.png`: the first prompt's knockout and route token-to-token matrices.",
        "",
        "Raw numbers: `summary.json`; per-head arrays: `arrays.npz`.",
        "",
    ]
    return "\n".join(lines)


def _discussion(S: dict) -> list[str]:
    t, h, p, fa, m = S["timing"], S["heads"], S["pairs"], S["faithfulness"], S["machine"]
    out = []
    device = m["device"]
    out.append(
        f"- **Speed.** Here patching every head took {_f(t['ratio_patching_over_routes'], 0)}x and knocking out "
        f"every token pair {_f(t['ratio_knockout_over_routes'], 0)}x the wall time of the routes of the same prompts "
        f"({_f(t['ratio_cpu_patching_over_routes'], 0)}x / {_f(t['ratio_cpu_knockout_over_routes'], 0)}x in CPU time; "
        f"{_f(t['ratio_patching_over_routes_both'], 0)}x / {_f(t['ratio_knockout_over_routes_both'], 0)}x against "
        "the routes of prompts and twins, which the contrastive ranking needs). The paper's ~100x compares its "
        "routes (5 s) with ACDC (8 min, GPU, GPT-2 small, 50 IOI prompts): ACDC patches *edges* iteratively and "
        "is not a per-head sweep, so the numbers are not the same measurement. The ratio here scales with the "
        "number of heads (patching: L x H passes per prompt) and with T^2 (knockout), so it grows with the model "
        "and the prompt; routes cost about one forward pass plus the importance maths."
    )
    out.append(
        f"- **Timings are {device} timings** with {m['torch_threads']} torch threads on a shared machine (see the "
        "load average above). In (a) the routes run one prompt at a time while the baselines are batched "
        f"({S['batch_size']} rows per pass), which favours the baselines; (a_b) batches the routes too "
        f"({_f(t['routes_batched_s'], 2)} s, patching {_f(t['ratio_patching_over_routes_batched'], 0)}x, knockout "
        f"{_f(t['ratio_knockout_over_routes_batched'], 0)}x). On a GPU batching would shrink (b) and (c) more than "
        "(a). When other processes compete for the cores, the routes (many small operations, each a parallel "
        "region of every thread) slow down much more than the large batched passes of the baselines, so a busy "
        "machine understates the ratios: check the load average. Read the ratios as this machine's, not as "
        "constants."
    )
    diff_rho, freq_rho = h["spearman_diff_vs_patching"], h["spearman_freq_vs_patching"]
    agree = (
        f"- **Heads.** The contrastive flow difference and patching share {h['overlap_diff_vs_patching']} of their "
        f"top {h['top']} heads (chance {h['chance_overlap']:.2f}); Spearman over all heads "
        f"{_f(diff_rho, 2)}, against {_f(freq_rho, 2)} for the plain (non-contrastive) frequency."
    )
    if np.isfinite(diff_rho or np.nan) and np.isfinite(freq_rho or np.nan) and diff_rho > freq_rho:
        agree += (" Subtracting the twins' routes brings flow closer to patching, as the paper's figure 6 "
                  "(right) suggests: heads used for every prediction drop out of the difference.")
    out.append(agree)
    out.append(
        f"- **Connections.** Knockout and routes agree on the top {p['k']} token pairs "
        f"{_f(p['all/overlap']['mean'], 2)} of the time (chance {_f(p['all/chance']['mean'], 2)}). The strongest "
        f"knockout effect comes from a source j = 0 in {100 * p['all/strongest_knockout_source_is_first']['mean']:.0f}% "
        "of the prompts: zeroing attention to the first token (an attention sink in many models) removes weight "
        "without renormalising, the kind of 'hemorrhage' the connectome write-up warns about. Without the first "
        f"token the overlap is {_f(p['no_first/overlap']['mean'], 2)} and the Spearman correlation "
        f"{_f(p['no_first/spearman_flow']['mean'], 2)} (all pairs: {_f(p['all/spearman_flow']['mean'], 2)})."
    )
    curves = fa["curves"]
    rnd = curves.get("random", {})
    beats = []
    for name in ("routes: activation frequency", "routes: contrastive frequency difference"):
        if name in curves and rnd:
            below = [k for k in fa["ks"] if curves[name][str(k)]["mean"] < rnd[str(k)]["mean"] - rnd[str(k)]["sd"]]
            beats.append(f"{name.removeprefix('routes: ')} at {len(below)} of the {len(fa['ks'])} values of k "
                         f"({', '.join(map(str, below)) or 'none'})")
    if beats:
        out.append(
            "- **Faithfulness.** Ablating the routes' top heads leaves less of the logit difference than ablating "
            "as many random heads (by more than one sd of the random draws) for " + "; for ".join(beats) + ". The "
            "most frequent heads include generic ones (frequency 1 in every route, needed by the twins too), which "
            "the contrastive ranking discounts. The patching curve is not an independent check: replacing "
            "a head by its mean over ABC twins is close to the very intervention patching ranked the heads by "
            "(identical where a template group holds only the prompt's own twin). Ablation measures necessity "
            f"under a distribution shift ({fa['ablation']}-ablation) and downstream heads can compensate "
            "(self-repair), so a small drop does not prove a head unused."
        )
    out.append(
        "- **What patching sees.** Patching from the ABC twin only finds heads whose output differs between the "
        "prompt and its twin; the paper's point that the result depends on the contrastive template is not "
        "tested here (one twin per prompt)."
    )
    return out


# --- command line --------------------------------------------------------------------------------------
def _ks(value: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ks must be comma-separated integers like 1,5,10; got {value!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--ks must be positive integers; got {value!r}")
    return ks


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The comparison's options (shared by ``flowray compare`` and ``bench/compare_baselines.py``)."""
    p.add_argument("--model", default="smollm2", help="model spec (default: the packaged SmolLM2-135M)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--n", type=positive_int, default=50, help="IOI prompts (default 50, as in the paper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--templates", choices=["both", "ABBA", "BABA"], default="both")
    p.add_argument("--tau", type=tau_arg, default=0.03, help="route threshold (default 0.03, paper figure 6)")
    p.add_argument("--ks", type=_ks, default=DEFAULT_KS, help="heads to ablate, comma-separated (default 1,2,5,10,20,40)")
    p.add_argument("--random-draws", type=positive_int, default=5, help="random head sets per k (default 5)")
    p.add_argument("--top", type=positive_int, default=10, help="head top-k for the overlap (default 10)")
    p.add_argument("--pair-k", type=positive_int, default=5, help="token-pair top-k per prompt (default 5)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="rows per forward pass in the sweeps (default 128)")
    p.add_argument("--route-batch", type=positive_int, default=8,
                   help="prompts per edge_importances_batch call in the batched routes timing, and per "
                        "interleaved measurement chunk (default 8)")
    p.add_argument("--ablation", choices=list(ABLATIONS), default="mean")
    p.add_argument("--out", type=Path, default=Path("compare-out"), help="output directory (report.md, figures)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_from_args(args, command: str | None = None) -> dict:
    return run_comparison(
        model=args.model, n=args.n, seed=args.seed, out_dir=args.out, tau=args.tau, ks=args.ks,
        random_draws=args.random_draws, progress=not args.no_progress, top=args.top, pair_k=args.pair_k,
        batch_size=args.batch_size, route_batch=args.route_batch, ablation=args.ablation,
        templates=args.templates, device=args.device,
        command=command,
    )


def print_summary(summary: dict, file=None) -> None:
    file = file or sys.stdout
    t, h = summary["timing"], summary["heads"]
    print(
        f"routes {t['routes_s']:.2f} s | patching {t['patching_s']:.1f} s ({t['ratio_patching_over_routes']:.1f}x, "
        f"CPU {t['ratio_cpu_patching_over_routes']:.1f}x) | knockout {t['knockout_s']:.1f} s "
        f"({t['ratio_knockout_over_routes']:.1f}x, CPU {t['ratio_cpu_knockout_over_routes']:.1f}x) | "
        f"top-{h['top']} overlap {h['overlap_diff_vs_patching']}/{h['top']} | "
        f"Spearman {_f(h['spearman_diff_vs_patching'], 2)}",
        file=file,
    )
    print(f"report: {summary['report']}", file=file)


def _cmd_compare(args) -> int:
    command = "flowray " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    summary = run_from_args(args, command=command)
    print_summary(summary)
    return 0


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add ``flowray compare`` to the CLI's subparsers (handler returns an exit code)."""
    p = subparsers.add_parser(
        "compare",
        help="time and compare routes with activation patching and attention knockout on IOI (writes report.md)",
    )
    add_arguments(p)
    p.set_defaults(handler=_cmd_compare)
    return p
