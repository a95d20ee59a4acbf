"""Information flow routes vs patching baselines on IOI: how fast, how much agreement, how faithful.

``run_comparison`` measures, in one process with the model loaded once, the routes (the corpus job's
batched statistics, and one prompt at a time), per-head activation patching, attention knockout and
attribution patching (``flowray.baselines.measure``), compares what they find (head rankings;
token-to-token connections: ``flowray.baselines.agreement``) and ablates the heads each ranks highest
against random heads (``flowray.baselines.faithfulness``). It writes ``report.md``
(``flowray.baselines.report``), ``summary.json``, the raw arrays (``arrays.npz``) and PNG figures to
``out_dir``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from flowray.baselines.agreement import (HeadStats, RouteStats, head_agreement, head_stats, pair_agreement, route_stats,
                                         same_heads, spearman)
from flowray.baselines.faithfulness import faithfulness
from flowray.baselines.measure import (Measurement, Stopwatch, groups, load_average, machine, measure, prepare, timing,
                                       warm_up)
from flowray.baselines.options import ABLATION_MODES, DEFAULT_KS
from flowray.baselines.report import render_report
from flowray.checks import check_tau
from flowray.errors import InputError
from flowray.models.loading import LoadedModel, load_model
from flowray.plots import plot_effect_scatter, plot_faithfulness, plot_head_grids, plot_pair_example, pyplot, save_figure

log = logging.getLogger(__name__)


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
    route_batch: int = 25,
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
        random_draws: random head sets per k; top: head top-k for the ranking overlap; pair_k: token-pair top-k.
        batch_size: rows per forward pass in the patching / knockout / ablation sweeps.
        route_batch: at most this many prompts per ``prediction_stats_batch`` call (the batched routes, the
            headline timing); also the chunk of prompts after which the measurement moves on to the next
            method (interleaving).
        ablation: "mean" (per position over ABC twins of the same template and length) or "zero".
        reference_n: extra IOI prompts whose ABC twins join the mean-ablation reference (default 4 n).
        prompts: TaskPrompt-like records (text, contrastive, answer, wrong, template, meta) to use instead.
        command: the command line to print in the report (default: this call, spelled out).

    Returns:
        the summary dict also written to ``out_dir/summary.json``.
    """
    tau = check_tau(tau)
    ks = _check_options(ks, ablation, random_draws=random_draws, top=top, pair_k=pair_k, batch_size=batch_size,
                        route_batch=route_batch)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if command is None:
        command = _call(model=_model_label(model), n=n, seed=seed, out_dir=str(out_dir), tau=tau, ks=tuple(ks),
                        random_draws=random_draws, batch_size=batch_size, ablation=ablation)
    load_start = load_average()
    lm, load_seconds = _load(model, device)
    s = lm.adapter.shape
    ks = _fit_ks(ks, s.n_layers * s.n_heads)
    prompts, items, dropped = _prompts(lm, prompts, n=n, seed=seed, templates=templates)
    P = len(items)
    answer, wrong = torch.tensor([it.answer_id for it in items]), torch.tensor([it.wrong_id for it in items])
    by_length = groups(int(it.clean.shape[0]) for it in items)  # T -> prompt indices

    warm_up(lm, items[0], answer[:1], wrong[:1], tau)
    m = measure(lm, items, answer, wrong, tau=tau, route_batch=route_batch, batch_size=batch_size, progress=progress)
    clean_heads = head_stats(m.clean_last, s.n_layers, s.n_heads)  # the corpus job's routes: the rankings
    twin_heads = head_stats(m.twin_last, s.n_layers, s.n_heads)
    clean_stats = route_stats(m.clean_routes, s.n_layers, s.n_heads)  # edge-level routes: flows, token pairs
    twin_stats = route_stats(m.twin_routes, s.n_layers, s.n_heads)
    heads, rankings = head_agreement(clean_heads, twin_heads, m.patch.effect(), m.eap.effect(), top,
                                     flow_diff=clean_stats.flow - twin_stats.flow)
    with Stopwatch() as m.phases["faithfulness"]:
        faith = faithfulness(lm, items, by_length, answer, wrong, m.patch.ld_clean, rankings, ks=ks,
                             draws=random_draws, seed=seed, ablation=ablation,
                             reference_n=reference_n if reference_n is not None else 4 * P, templates=templates,
                             batch_size=batch_size, progress=progress)
    summary = {
        "model": lm.name, "n_requested": len(prompts), "n_used": P, "dropped": dropped, "seed": seed, "tau": tau,
        "templates": templates, "token_lengths": sorted(int(T) for T in by_length), "batch_size": batch_size,
        "ablation": ablation, "command": command,
        "machine": {**machine(lm.model), "load_average_start": load_start, "load_average_end": load_average(),
                    "load_average_chunks": m.load_averages},
        **_results(m, clean_heads, twin_heads, load_seconds=load_seconds, route_batch=route_batch,
                   same=same_heads(m.clean_routes + m.twin_routes, m.clean_last + m.twin_last, s.n_heads)),
        "heads": heads,
        "pairs": pair_agreement(m.knock, clean_stats, pair_k),
        "faithfulness": faith,
    }
    return _write(out_dir, summary, m, clean_heads, twin_heads, clean_stats, twin_stats, items, lm.tokenizer, top)


def _call(**kwargs) -> str:
    """This call, spelled out as a command line (for the report)."""
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"python -c \"from flowray.baselines import run_comparison; run_comparison({args})\""


def _check_options(ks, ablation: str, **positive: int) -> list[int]:
    """Refuse bad options before the (slow) model load; ``ks`` sorted and de-duplicated."""
    if ablation not in ABLATION_MODES:
        raise InputError(f"ablation must be one of {ABLATION_MODES}; got {ablation!r}")
    for name, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer; got {value!r}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise InputError(f"ks must be positive numbers of heads; got {ks!r}")
    return ks


def _load(model, device: str) -> tuple[LoadedModel, float]:
    """The model (loaded unless it is a LoadedModel already) and the seconds loading took."""
    t0 = time.perf_counter()
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    return lm, time.perf_counter() - t0


def _fit_ks(ks: list[int], n_all: int) -> list[int]:
    """The ks that a model of ``n_all`` heads can ablate (at least one must fit)."""
    if ks[0] > n_all:
        raise InputError(f"ks must include a number of heads <= {n_all} (the model's heads); got {ks!r}")
    return [k for k in ks if k <= n_all]


def _prompts(lm, prompts, *, n: int, seed: int, templates: str):
    """``(prompts, usable items, why the others were dropped)``; IOI prompts unless ``prompts`` is given."""
    if prompts is None:
        from flowray.tasks import ioi_prompts

        prompts = ioi_prompts(n, seed=seed, tokenizer=lm.tokenizer, templates=templates)
    items, dropped = prepare(prompts, lm.tokenizer)
    for why in dropped:
        log.warning("dropped prompt %s", why)
    if not items:
        raise InputError(f"none of the {len(prompts)} prompts is usable: {dropped[:3]}")
    return prompts, items, dropped


def _results(m: Measurement, clean: HeadStats, twins: HeadStats, *, load_seconds: float, route_batch: int,
             same: bool) -> dict:
    """The summary's ``task`` (logit differences, route sizes) and ``timing`` parts."""
    ld_clean, ld_corrupt = m.patch.ld_clean, m.patch.ld_corrupt
    task = {
        "ld_clean_mean": float(ld_clean.mean()),
        "ld_corrupt_mean": float(ld_corrupt.mean()),
        "accuracy_ld_positive": float((ld_clean > 0).mean()),
        "route_heads_mean": float(np.mean(clean.n_heads_in_route)),
        "route_heads_contrastive_mean": float(np.mean(twins.n_heads_in_route)),
    }
    times = timing(m, load_seconds=load_seconds, route_batch=route_batch, n_heads_total=clean.freq.size,
                   same_heads=same)
    return {"task": task, "timing": times}


def _write(out_dir: Path, summary: dict, m: Measurement, clean: HeadStats, twins: HeadStats, clean_routes: RouteStats,
           twin_routes: RouteStats, items, tok, top: int) -> dict:
    """``arrays.npz``, the figures, ``summary.json`` and ``report.md``; returns the summary."""
    effect = m.patch.effect()
    diff = clean.freq - twins.freq
    arrays = {
        "patching_effect": effect,
        "patching_ld_patched": m.patch.ld_patched,
        "ld_clean": m.patch.ld_clean,
        "ld_corrupt": m.patch.ld_corrupt,
        "eap_effect": m.eap.effect(),
        "eap_ld_patched": m.eap.ld_patched,
        "flow_freq": clean.freq,
        "flow_freq_contrastive": twins.freq,
        "flow_importance": clean.importance,
        "flow_importance_contrastive": twins.importance,
        "flow_head_flow": clean_routes.flow,
        "flow_head_flow_contrastive": twin_routes.flow,
    }
    np.savez_compressed(out_dir / "arrays.npz", **arrays)
    tokens = [tok.decode([t]) for t in items[0].clean.tolist()]
    summary["figures"] = _figures(out_dir, effect, clean.freq, diff, summary["faithfulness"], m.knock[0][1],
                                  clean_routes.pair_flow[0], tokens, top)
    (out_dir / "summary.json").write_text(json.dumps(_jsonable(summary), indent=1))
    report = out_dir / "report.md"
    report.write_text(render_report(summary))
    summary["report"] = str(report)
    return summary


def _figures(out_dir: Path, effect, freq, diff, faith: dict, delta, pair_flow, tokens: list[str], top: int) -> dict:
    plt = pyplot()
    made = {}
    for name, make in (
        ("faithfulness.png", lambda: plot_faithfulness(faith)),
        ("heads_grid.png", lambda: plot_head_grids(effect, freq, diff)),
        ("heads_scatter.png", lambda: plot_effect_scatter(effect, diff, top, rho=spearman(effect, diff))),
        ("pairs_example.png", lambda: plot_pair_example(delta, pair_flow, tokens)),
    ):
        fig = make()
        save_figure(fig, out_dir / name)
        plt.close(fig)
        made[name.removesuffix(".png")] = name
    return made


def _model_label(model) -> str:
    return model if isinstance(model, str) else getattr(model, "name", type(model).__name__)


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
