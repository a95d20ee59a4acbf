"""matplotlib figures. Each function takes data (and optionally an Axes) and returns the Figure.

Routes (paper figure 1), the corpus job's figures (9a, 10) and the baselines comparison's figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowray.routes import EdgeKind, NodeKind, Route


def pyplot():
    """matplotlib.pyplot, on the Agg backend when there is no display (headless machines, Ray workers)."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "svg", "pdf") and not _has_display():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _has_display() -> bool:
    import os

    return bool(os.environ.get("DISPLAY") or os.environ.get("MPLBACKEND"))


def _level(node, parallel: bool) -> float:
    """Vertical coordinate: embed 0; sequential block l: attn 2l+1, block 2l+2; parallel block l: l+1."""
    if node.kind is NodeKind.EMBED:
        return 0.0
    if parallel:
        return node.layer + 1.0
    return 2.0 * node.layer + (1.0 if node.kind is NodeKind.ATTN else 2.0)


def save_figure(fig, path: str | Path) -> Path:
    """Save as PNG or SVG (by suffix); anything else is an error before matplotlib guesses."""
    from flowray.errors import InputError

    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg"):
        raise InputError(f"figure path must end in .png or .svg; got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150 if path.suffix.lower() == ".png" else None, bbox_inches="tight")
    return path


def plot_route(route: Route, path: str | Path | None = None, ax=None, *, max_width: float = 6.0):
    """Draw a route like the paper's figure 1.

    Tokens run along the bottom, layers upwards; grey verticals are the residual streams; attention edges
    join streams with a width proportional to their importance (hover-free: the strongest heads of the
    edges between tokens are written on them, strongest first, where they do not overlap); FFNs are squares
    on the stream, darker when more important.
    """
    plt = pyplot()
    from matplotlib.collections import LineCollection

    T = route.position + 1  # later tokens cannot be on the route
    L = route.n_layers
    parallel = route.parallel
    top_level = float(L if parallel else 2 * L)
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * T + 2), max(5.0, 0.24 * top_level + 2)))
    else:
        fig = ax.figure
    xs = np.arange(T)
    # residual streams of every token, as a faint background
    ax.vlines(xs, 0, top_level, colors="#e4e4e4", linewidth=1.0, zorder=0)
    if not parallel:
        for l in range(L):  # light band marking each block
            ax.axhspan(2 * l + 0.5, 2 * l + 2.5, color="#f6f6f6" if l % 2 else "white", zorder=-1, lw=0)

    att_segs, att_w, res_segs, res_w = [], [], [], []
    ffn_pts, ffn_imp = [], []
    labels = []
    for e in route.edges:
        y0, y1 = _level(e.source, parallel), _level(e.target, parallel)
        if e.kind is EdgeKind.FFN:
            ffn_pts.append((e.target.position + 0.18, (y0 + y1) / 2))
            ffn_imp.append(e.importance)
        elif e.kind is EdgeKind.RESIDUAL:
            res_segs.append([(e.source.position, y0), (e.target.position, y1)])
            res_w.append(e.importance)
        else:
            att_segs.append([(e.source.position, y0), (e.target.position, y1)])
            att_w.append(e.importance)
            if e.importance >= LABEL_ABOVE and e.source.position != e.target.position:
                heads = ",".join(f"H{h.head}" for h in e.heads[:3])
                xy = ((e.source.position + e.target.position) / 2, (y0 + y1) / 2)  # the edge's midpoint
                labels.append((e.importance, xy, f"L{e.target.layer}{heads}"))
    if res_segs:
        ax.add_collection(LineCollection(res_segs, linewidths=0.5 + max_width * 0.35 * np.asarray(res_w),
                                         colors="#8c8c8c", zorder=2, capstyle="round"))
    if att_segs:
        w = np.asarray(att_w)
        colors = plt.get_cmap("Blues")(0.45 + 0.55 * np.clip(w / max(w.max(), 1e-9), 0, 1))
        ax.add_collection(LineCollection(att_segs, linewidths=0.5 + max_width * w, colors=colors,
                                         zorder=3, alpha=0.9, capstyle="round"))
    if ffn_pts:
        pts = np.asarray(ffn_pts)
        ax.scatter(pts[:, 0], pts[:, 1], marker="s", s=26 + 60 * np.asarray(ffn_imp),
                   c=np.asarray(ffn_imp), cmap="Oranges", vmin=-0.2, vmax=1.0, edgecolors="#8a4b08",
                   linewidths=0.5, zorder=4)
    node_xy = np.asarray([(n.position, _level(n, parallel)) for n in route.nodes])
    if len(node_xy):
        ax.scatter(node_xy[:, 0], node_xy[:, 1], s=5, c="#3a3a3a", zorder=5)
    _route_axes(ax, route, plt, top_level)
    fig.tight_layout()
    _head_labels(ax, labels)
    if path is not None:
        save_figure(fig, path)
    return fig


LABEL_ABOVE = 0.1  # attention edges between two tokens at least this important get their heads written on them


def _head_labels(ax, labels: list[tuple[float, tuple[float, float], str]]) -> None:
    """Write ``(importance, (x, y), text)`` labels at their edges' midpoints, strongest first, leaving out any
    that would overlap one already written (crowded layers keep their strongest edges' labels)."""
    renderer = ax.figure.canvas.get_renderer()
    placed = []
    for _, (x, y), text in sorted(labels, key=lambda item: -item[0]):
        t = ax.text(x, y, text, fontsize=6, ha="center", va="center", color="#08306b", zorder=6,
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
        box = t.get_window_extent(renderer).expanded(1.05, 1.15)
        if any(box.overlaps(other) for other in placed):
            t.remove()
        else:
            placed.append(box)


def _route_axes(ax, route: Route, plt, top_level: float) -> None:
    """Ticks (tokens below, layers on the left), title and legend of ``plot_route``."""
    T, L, parallel = route.position + 1, route.n_layers, route.parallel
    xs = np.arange(T)
    ax.set_xlim(-0.7, T - 0.3)
    ax.set_ylim(-0.6, top_level + 0.8)
    ax.set_xticks(xs)
    ax.set_xticklabels([repr(t)[1:-1] if t else str(i) for i, t in enumerate(route.tokens[:T])],
                       rotation=60, ha="right", fontsize=8)
    ax.get_xticklabels()[-1].set_fontweight("bold")
    ax.set_yticks([0.0] + [(l + 1.0) if parallel else 2.0 * l + 2.0 for l in range(L)])  # every layer's x^l
    ax.set_yticklabels(["emb"] + [f"L{l}" for l in range(L)], fontsize=8 if L <= 40 else 6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    predicted = route.prediction.get("token")
    title = f"Information flow route, tau = {route.tau:g}, position {route.position}"
    if predicted is not None:
        title += f" -> predicts {predicted!r}"
    if route.model:
        title = f"{route.model}: " + title
    ax.set_title(title, fontsize=10)
    from matplotlib.lines import Line2D

    ax.legend(
        handles=[
            Line2D([0], [0], color=plt.get_cmap("Blues")(0.8), lw=3, label="attention edge (width = importance)"),
            Line2D([0], [0], color="#6f6f6f", lw=2, label="residual edge"),
            Line2D([0], [0], marker="s", color="w", markerfacecolor="#f5a25d", markeredgecolor="#8a4b08",
                   markersize=8, label="FFN edge"),
        ],
        loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False,
    )


def _grid(df, value: str, n_layers: int, n_heads: int) -> np.ndarray:
    """``[layer, head]`` matrix of ``value`` from a long table with layer/head columns."""
    out = np.full((n_layers, n_heads), np.nan)
    for layer, head, v in zip(df["layer"].to_list(), df["head"].to_list(), df[value].to_list()):
        if head is not None:
            out[layer, head] = v
    return out


def activation_map(head_activation, ffn_activation, component_importance, head_roles, *, domain: str, tau: float,
                   n_layers: int, n_heads: int, ax=None):
    """Paper figure 9a: head activation frequency at ``tau`` (layer x head) with previous-token heads
    (yellow) and subword-merging heads (red) marked, and each layer's FFN importance beside it."""
    import polars as pl

    plt = pyplot()
    act = head_activation.filter((pl.col("domain") == domain) & ((pl.col("tau") - tau).abs() < 1e-9))
    grid = _grid(act, "frequency", n_layers, n_heads)
    ffn = component_importance.filter((pl.col("domain") == domain) & (pl.col("component") == "ffn")).sort("layer")
    roles = head_roles.filter(pl.col("domain") == domain)
    fig, (ax_h, ax_f) = plt.subplots(1, 2, figsize=(max(5.0, 0.45 * n_heads + 3.5), max(4.0, 0.22 * n_layers + 1.5)),
                                     gridspec_kw={"width_ratios": [max(n_heads, 3), 2.2]}, sharey=True)
    im = ax_h.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=1)
    for role, color in (("previous_token", "#ffd700"), ("subword_merging", "#e8222f")):
        marked = roles.filter(pl.col("role") == role)
        ax_h.scatter(marked["head"].to_list(), marked["layer"].to_list(), s=90, facecolors="none",
                     edgecolors=color, linewidths=2.0, label=role.replace("_", "-") + " head")
    ax_h.set_xlabel("head")
    ax_h.set_ylabel("layer")
    ax_h.set_xticks(range(n_heads))
    ax_h.set_title(f"{domain}: head activation frequency (tau = {tau:g})", fontsize=10)
    fig.colorbar(im, ax=ax_h, fraction=0.046, pad=0.02, label="share of predictions with the head in the route")
    ax_h.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize=8, frameon=False)
    ax_f.barh(ffn["layer"].to_list(), ffn["importance"].to_list(), color="#f5a25d", edgecolor="#8a4b08")
    ax_f.set_xlabel("mean FFN importance")
    ax_f.set_title("FFN", fontsize=10)
    for side in ("top", "right"):
        ax_f.spines[side].set_visible(False)
    fig.tight_layout()
    return fig


def domain_comparison(component_importance, specialisation, *, general: str, n_layers: int, n_heads: int):
    """Paper figure 10: mean head importance (layer x head) per domain, general domain first; heads
    specialised for a domain (high there, low in general) are outlined; FFN importance per layer below."""
    import polars as pl

    plt = pyplot()
    from matplotlib.colors import PowerNorm

    domains = [general] + sorted(set(component_importance["domain"].to_list()) - {general})
    heads = component_importance.filter(pl.col("component") == "head")
    vmax = float(heads["importance"].max() or 1.0)
    fig, axes = plt.subplots(2, len(domains), figsize=(max(6.0, 1.9 * len(domains)), 0.2 * n_layers + 4.5),
                             gridspec_kw={"height_ratios": [3, 1]}, squeeze=False)
    im = None
    for col, domain in enumerate(domains):
        ax = axes[0, col]
        grid = _grid(heads.filter(pl.col("domain") == domain), "importance", n_layers, n_heads)
        # square-root colour scale: a few dominant heads must not hide the rest
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="magma", norm=PowerNorm(0.5, vmin=0, vmax=vmax))
        spec = specialisation.filter((pl.col("domain") == domain) & pl.col("specialised"))
        if spec.height:
            ax.scatter(spec["head"].to_list(), spec["layer"].to_list(), s=70, facecolors="none",
                       edgecolors="#00e5ff", linewidths=1.8)
        ax.set_title(domain + (" (general)" if domain == general else ""), fontsize=9)
        ax.set_xticks([])
        if col == 0:
            ax.set_ylabel("layer")
        else:
            ax.set_yticks([])
        ffn = component_importance.filter((pl.col("domain") == domain) & (pl.col("component") == "ffn")).sort("layer")
        axes[1, col].bar(ffn["layer"].to_list(), ffn["importance"].to_list(), color="#f5a25d", width=0.9)
        axes[1, col].set_ylim(0, 1)
        axes[1, col].set_xlabel("layer (FFN)", fontsize=8)
        if col:
            axes[1, col].set_yticks([])
    fig.colorbar(im, ax=axes[0, :].tolist(), fraction=0.02, pad=0.01, label="mean head importance")
    fig.suptitle("Average importance of heads and FFNs per domain; cyan: specialised for that domain", fontsize=10)
    return fig


# --- the baselines comparison (flowray.baselines) -----------------------------------------------------
def plot_faithfulness(faith: dict, ax=None):
    """LD retained vs number of ablated heads: one line per ranking, random as mean +- sd band.

    ``faith``: the ``faithfulness`` part of ``flowray.baselines.run_comparison``'s summary.
    """
    plt = pyplot()
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
    plt = pyplot()
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


def plot_effect_scatter(effect: np.ndarray, diff: np.ndarray, top: int = 10, ax=None, *, rho: float | None = None):
    """Each head: patching effect (x) vs route frequency difference (y), both ``[L, H]``; the top heads by
    patching are labelled; ``rho`` (their Spearman correlation) goes into the title when given."""
    plt = pyplot()
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
    ax.set_title("Heads: patching vs flow" + (f" (rho = {rho:.2f})" if rho is not None else ""))
    return fig


def plot_pair_example(delta: np.ndarray, flow: np.ndarray, tokens: list[str], axes=None):
    """One prompt: knockout |LD change| and route flow per token pair (query i rows, source j columns)."""
    plt = pyplot()
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
