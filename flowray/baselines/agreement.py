"""How far the routes and the baselines agree: rank statistics, head rankings and token-pair agreement.

numpy only. Shapes: ``L`` layers, ``H`` heads, ``T`` tokens. Definitions (the report states them too):

- activation frequency of a head: the fraction of prompts whose last-position route has at least one
  sub-edge through it (paper section 3.1); contrastive frequency difference: on the prompts minus on their
  twins; both from the corpus job's statistics (``HeadStats``), ties broken by the head's mean importance
  at the last position (its summed sub-edge importance there, the section 4 component vector);
- a head's flow and the token-to-token route strength: ``flowray.routes.route_flows`` of the edge-level
  routes (``RouteStats``), which the statistics do not keep;
- knockout strength of (i, j) = ``LD_clean - LD_knocked``; rankings use its absolute value.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from flowray.errors import InputError
from flowray.routes import route_flows


# --- rank statistics ------------------------------------------------------------------------------------
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


def rank_heads(primary: np.ndarray, secondary: np.ndarray | None = None) -> list[tuple[int, int]]:
    """All (layer, head) by ``primary`` descending, ties by ``secondary`` descending, then by index."""
    L, H = primary.shape
    sec = np.zeros_like(primary) if secondary is None else secondary
    order = np.lexsort((np.arange(L * H), -sec.ravel(), -primary.ravel()))
    return [(int(i) // H, int(i) % H) for i in order]


def mean_sd(xs) -> tuple[float, float]:
    xs = np.asarray([x for x in xs if np.isfinite(x)], dtype=float)
    if xs.size == 0:
        return float("nan"), float("nan")
    return float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else 0.0


# --- routes: frequencies and flows ------------------------------------------------------------------------
@dataclass
class HeadStats:
    freq: np.ndarray  # [L, H] activation frequency over prompts
    importance: np.ndarray  # [L, H] mean importance of the head at the last position
    n_heads_in_route: list  # per prompt


def head_stats(last_routes, n_layers: int, n_heads: int) -> HeadStats:
    """Frequencies and last-position importances of ``flowray.baselines.batched.LastRoute`` records."""
    freq = np.zeros(n_layers * n_heads)
    importance = np.zeros(n_layers * n_heads)
    for r in last_routes:
        freq[r.heads] += 1
        importance += r.importance
    n = max(len(last_routes), 1)
    return HeadStats((freq / n).reshape(n_layers, n_heads), (importance / n).reshape(n_layers, n_heads),
                     [len(r.heads) for r in last_routes])


def same_heads(routes, last_routes, n_heads: int) -> bool:
    """Whether each ``(route, T)`` holds exactly the heads of the matching ``LastRoute``."""
    return len(routes) == len(last_routes) and all(
        sorted(route.heads()) == r.head_pairs(n_heads) for (route, _), r in zip(routes, last_routes))


@dataclass
class RouteStats:
    freq: np.ndarray  # [L, H] activation frequency over prompts
    flow: np.ndarray  # [L, H] mean head flow
    pair_flow: list  # per prompt [T, T]
    pair_imp: list  # per prompt [T, T]
    n_heads_in_route: list  # per prompt


def route_stats(routes, n_layers: int, n_heads: int) -> RouteStats:
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
    return RouteStats(freq / n, flow / n, pair_flow, pair_imp, n_in_route)


# --- agreement ----------------------------------------------------------------------------------------
def head_row(h, effect, diff, freq, eap) -> dict:
    l, k = h
    return {"layer": l, "head": k, "patching_effect": float(effect[l, k]), "flow_diff": float(diff[l, k]),
            "flow_freq": float(freq[l, k]), "eap_effect": float(eap[l, k])}


def head_agreement(clean: HeadStats, twins: HeadStats, effect: np.ndarray, eap: np.ndarray, top: int, *,
                   flow_diff: np.ndarray | None = None) -> tuple[dict, dict]:
    """Route rankings vs the patching and EAP rankings of heads: ``(summary rows, rankings by name)``.

    ``clean``/``twins``: head statistics of the prompts and of their ABC twins; ``effect``, ``eap``:
    ``[L, H]`` the patching effect and EAP's estimate of it; ``flow_diff``: ``[L, H]`` the difference of mean
    route flow (edge-level routes), reported as one more correlation. Routes rank heads by the contrastive
    frequency difference (ties by the difference of mean last-position importance) or by the plain
    frequency (ties by importance); patching and EAP by their effects.
    """
    diff = clean.freq - twins.freq  # [L, H]
    rank_flow_diff = rank_heads(diff, clean.importance - twins.importance)
    rank_flow_freq = rank_heads(clean.freq, clean.importance)
    rank_patch = rank_heads(effect)
    rank_eap = rank_heads(eap)
    n_all = effect.size
    top_eff, top_eap = set(rank_patch[:top]), set(rank_eap[:top])
    rows = {
        "top": top,
        "chance_overlap": top * top / n_all,
        "overlap_diff_vs_patching": len(set(rank_flow_diff[:top]) & top_eff),
        "overlap_freq_vs_patching": len(set(rank_flow_freq[:top]) & top_eff),
        "overlap_eap_vs_patching": len(top_eap & top_eff),
        "overlap_diff_vs_eap": len(set(rank_flow_diff[:top]) & top_eap),
        "spearman_diff_vs_patching": spearman(diff, effect),
        "spearman_freq_vs_patching": spearman(clean.freq, effect),
        "spearman_diff_flow_vs_patching": spearman(flow_diff, effect) if flow_diff is not None else float("nan"),
        "spearman_abs_diff_vs_abs_patching": spearman(np.abs(diff), np.abs(effect)),
        "spearman_eap_vs_patching": spearman(eap, effect),
        "spearman_diff_vs_eap": spearman(diff, eap),
        "top_patching": [head_row(h, effect, diff, clean.freq, eap) for h in rank_patch[:top]],
        "top_flow_diff": [head_row(h, effect, diff, clean.freq, eap) for h in rank_flow_diff[:top]],
        "top_flow_freq": [head_row(h, effect, diff, clean.freq, eap) for h in rank_flow_freq[:top]],
        "top_eap": [head_row(h, effect, diff, clean.freq, eap) for h in rank_eap[:top]],
        "heads_with_freq_1": int((clean.freq >= 1.0).sum()),
    }
    rankings = {"routes: activation frequency": rank_flow_freq,
                "routes: contrastive frequency difference": rank_flow_diff,
                "patching effect": rank_patch,
                "EAP (attribution patching)": rank_eap}
    return rows, rankings


def pair_agreement(knock, stats: RouteStats, k: int) -> dict:
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
        mean, sd = mean_sd(values)
        out[key] = {"mean": mean, "sd": sd, "n": int(np.isfinite(np.asarray(values, dtype=float)).sum())}
    return out
