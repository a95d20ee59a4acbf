"""The comparison's report: ``report.md`` rendered from the summary dict, and the one-line summary.

Everything shown is read from the summary (``summary.json``), so ``write_report`` renders a report again
without a model. Definitions (stated in the report too):

- logit difference ``LD = logit(answer) - logit(wrong)`` at the last position (IOI: IO minus subject);
- patching effect of head (l, h): ``mean_p(LD_clean - LD_patched) / mean_p(LD_clean - LD_corrupt)``;
- activation frequency, contrastive frequency difference, route flow: ``flowray.baselines.agreement``;
- knockout strength of (i, j) = ``LD_clean - LD_knocked``; rankings use its absolute value;
- faithfulness: ``flowray.baselines.faithfulness``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from flowray.errors import InputError


def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def write_report(out_dir: str | Path) -> Path:
    """Render ``out_dir/report.md`` again from ``out_dir/summary.json`` (no model, nothing re-measured)."""
    out_dir = Path(out_dir)
    path = out_dir / "summary.json"
    if not path.is_file():
        raise InputError(f"{str(path)!r} does not exist; run run_comparison(out_dir=...) first")
    report = out_dir / "report.md"
    report.write_text(render_report(json.loads(path.read_text())))
    return report


def render_report(S: dict) -> str:
    """The Markdown report of a comparison summary (``summary.json``)."""
    sections = _setup(S) + _time(S) + _heads(S) + _pairs(S) + _faithfulness(S)
    return "\n".join(sections + ["", "## Discussion", ""] + _discussion(S) + _figures())


def _setup(S: dict) -> list[str]:
    m, task = S["machine"], S["task"]
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
        f"Machine: {m['device']}, CPU `{m['cpu']}`, {m['cpu_count']} cores, torch threads {m['torch_threads']} "
        f"(GOMP_SPINCOUNT {m.get('gomp_spincount') or 'unset'}: `flowray.threads`); "
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
    return lines



def _time(S: dict) -> list[str]:
    t, m = S["timing"], S["machine"]
    P = S["n_used"]
    sp = t["split_per_prompt_s"]
    ms = 1000.0
    r, rb, ru = t["ratios"], t["ratios_both"], t["ratios_unbatched"]
    rc, rbc, ruc = t["ratios_cpu"], t["ratios_both_cpu"], t["ratios_unbatched_cpu"]
    names = {"patching": "per-head activation patching", "knockout": "attention knockout", "eap": "EAP"}
    return [
        "",
        "## Time",
        "",
        "All measured in the same process, model loaded once "
        f"(loading took {_f(t['load_model_s'], 1)} s, not counted), after one untimed warm-up pass of each kind. "
        f"The methods take turns on chunks of at most {t['routes_batch']} prompts (sorted by token length), so a "
        "busy spell of the machine slows them alike. 1-minute load average "
        f"{_f(m.get('load_average_start'), 1)} before the run and {_f(m.get('load_average_end'), 1)} at its end "
        f"on {m['cpu_count']} cores{_loads(m.get('load_average_chunks'))}.",
        "",
        "Wall: wall-clock seconds. CPU: process CPU seconds over all threads (about threads x wall when the "
        "cores are free; steadier than wall when other processes share the machine).",
        "",
        "| what | passes | wall s | CPU s |",
        "| --- | ---: | ---: | ---: |",
        f"| **(a_b) routes of the {P} prompts, the corpus job's batched statistics** (`prediction_stats_batch`, "
        f"padded batches of up to {t['routes_batch']}, last position) | {t['routes_batched_calls']} | "
        f"**{_f(t['routes_batched_s'], 2)}** | {_f(t['routes_batched_cpu_s'], 2)} |",
        f"| (a_b') the same for the {P} ABC twins (for the contrastive difference) | {t['routes_batched_calls']} | "
        f"{_f(t['routes_batched_contrastive_s'], 2)} | {_f(t['routes_batched_contrastive_cpu_s'], 2)} |",
        f"| (a) routes of the {P} prompts one prompt at a time (edge_importances + extract_route; same heads as "
        f"(a_b), twins included: {'yes' if t['routes_batched_same_heads'] else 'NO'}) | {P} | "
        f"{_f(t['routes_s'], 2)} | {_f(t['routes_cpu_s'], 2)} |",
        f"| (a') the twins one at a time | {P} | {_f(t['routes_contrastive_s'], 2)} | "
        f"{_f(t['routes_contrastive_cpu_s'], 2)} |",
        f"| (b) per-head activation patching, every head of every layer (batch {S['batch_size']}) | "
        f"{t['patching_forward_passes']} | {_f(t['patching_s'], 1)} | {_f(t['patching_cpu_s'], 1)} |",
        f"| (c) attention knockout of every token pair j < i (batch {S['batch_size']}) | "
        f"{t['knockout_forward_passes']} | {_f(t['knockout_s'], 1)} | {_f(t['knockout_cpu_s'], 1)} |",
        f"| (d) EAP: attribution patching of every head (per batch of one length: corrupted forward, clean "
        f"forward, backward) | {t['eap_calls']} x 3 | {_f(t['eap_s'], 2)} | {_f(t['eap_cpu_s'], 2)} |",
        "",
        "Baselines over routes (how many times longer the baseline takes):",
        "",
        "| baseline | / (a_b) batched routes | CPU | / ((a_b) + (a_b')) prompts and twins | CPU | "
        "/ (a) one prompt at a time | CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {names[k]} | **{_f(r[k], 1)}x** | {_f(rc[k], 1)}x | {_f(rb[k], 1)}x | {_f(rbc[k], 1)}x | "
          f"{_f(ru[k], 1)}x | {_f(ruc[k], 1)}x |" for k in ("patching", "knockout", "eap")],
        "",
        f"Where (a_b)'s time goes, per prompt (wall ms; {_f(sp['total'] * ms, 1)} ms in all): forward pass "
        f"{_f(sp['forward'] * ms, 1)} (a plain forward pass of the same padded batch, timed beside it), "
        f"importances {_f(sp['importances'] * ms, 1)} (the rest of the forward pass under the capture: eager "
        "attention, the streamed sub-edge importances and their reductions, the last position's top-1 token), "
        f"routes {_f(sp['routes'] * ms, 1)} (the last position's route of every prompt in one pass, then the "
        f"copies to the host), Python overhead {_f(sp['python_overhead'] * ms, 1)} (input checks, padding and "
        f"per-sequence state before the forward pass), unaccounted {_f(sp['outside_split'] * ms, 1)}. The "
        "importances of a layer are computed for the whole padded batch at once inside the forward pass (one "
        "kernel call per layer), so their Python counts under importances, not under overhead.",
        "",
        f"(The faithfulness ablations below took {_f(t['faithfulness_s'], 1)} s; they are an evaluation, not a "
        "method, and are not in the ratios.)",
    ]



def _loads(loads) -> str:
    loads = [x for x in loads or [] if x is not None]
    if not loads:
        return ""
    return f"; as each chunk began: mean {_f(float(np.mean(loads)), 1)}, max {_f(max(loads), 1)}"


def _heads(S: dict) -> list[str]:
    h = S["heads"]
    top = h["top"]
    lines = [
        "",
        "## Agreement: heads",
        "",
        "Flow ranks heads by their contrastive activation frequency difference (frequency in the last-position "
        "routes of the prompts, from the batched statistics (a_b), minus in the routes of their ABC twins; ties "
        "by the difference of the heads' mean importance at the last position). Patching ranks them by the "
        "normalised drop of the mean logit difference when the head's output is patched from the twin; EAP by "
        "its first-order estimate of the same drop ((a_corrupt - a_clean) . dLD/da at the head's output, "
        "summed over positions, normalised alike).",
        "",
        "| comparison | value |",
        "| --- | ---: |",
        f"| top-{top} overlap, flow difference vs patching | **{h['overlap_diff_vs_patching']} / {top}** "
        f"(chance {h['chance_overlap']:.2f}) |",
        f"| top-{top} overlap, plain flow frequency vs patching | {h['overlap_freq_vs_patching']} / {top} |",
        f"| Spearman, flow difference vs patching effect (all heads) | **{_f(h['spearman_diff_vs_patching'])}** |",
        f"| Spearman, difference of mean route flow (edge-level routes (a)) vs patching effect | "
        f"{_f(h['spearman_diff_flow_vs_patching'])} |",
        f"| Spearman, plain flow frequency vs patching effect | {_f(h['spearman_freq_vs_patching'])} |",
        f"| Spearman, abs(flow difference) vs abs(patching effect) | {_f(h['spearman_abs_diff_vs_abs_patching'])} |",
        f"| top-{top} overlap, EAP vs patching | {h['overlap_eap_vs_patching']} / {top} |",
        f"| Spearman, EAP vs patching effect | {_f(h['spearman_eap_vs_patching'])} |",
        f"| top-{top} overlap, flow difference vs EAP | {h['overlap_diff_vs_eap']} / {top} |",
        f"| Spearman, flow difference vs EAP | {_f(h['spearman_diff_vs_eap'])} |",
        f"| heads in every prompt's route (frequency 1) | {h['heads_with_freq_1']} |",
        "",
        f"Top {top} heads by patching effect, by flow difference and by EAP:",
        "",
        "| rank | patching: head | effect | its flow diff | flow: head | flow diff | its effect | EAP: head | "
        "EAP effect | its effect |",
        "| ---: | --- | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for r, (a, b, c) in enumerate(zip(h["top_patching"], h["top_flow_diff"], h["top_eap"]), 1):
        lines.append(
            f"| {r} | {a['layer']}.{a['head']} | {_f(a['patching_effect'])} | {_f(a['flow_diff'], 2)} | "
            f"{b['layer']}.{b['head']} | {_f(b['flow_diff'], 2)} | {_f(b['patching_effect'])} | "
            f"{c['layer']}.{c['head']} | {_f(c['eap_effect'])} | {_f(c['patching_effect'])} |"
        )
    return lines



def _pairs(S: dict) -> list[str]:
    p = S["pairs"]
    k = p["k"]
    lines = [
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
    return lines



def _faithfulness(S: dict) -> list[str]:
    fa = S["faithfulness"]
    ks = fa["ks"]
    lines = [
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
    return lines



def _figures() -> list[str]:
    return [
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


def _discussion(S: dict) -> list[str]:
    t, h, p, fa, m = S["timing"], S["heads"], S["pairs"], S["faithfulness"], S["machine"]
    out = []
    device = m["device"]
    r, ru = t["ratios"], t["ratios_unbatched"]
    out.append(
        f"- **Speed.** Here patching every head took {_f(r['patching'], 0)}x, knocking out every token pair "
        f"{_f(r['knockout'], 0)}x and EAP {_f(r['eap'], 1)}x the wall time of the batched routes of the same "
        f"prompts ({_f(t['ratios_both']['patching'], 0)}x / {_f(t['ratios_both']['knockout'], 0)}x / "
        f"{_f(t['ratios_both']['eap'], 1)}x against the routes of prompts and twins, which the contrastive "
        f"ranking needs; {_f(ru['patching'], 0)}x / {_f(ru['knockout'], 0)}x / {_f(ru['eap'], 1)}x against the "
        "routes one prompt at a time). EAP, like the routes, costs a few passes per prompt whatever the number of "
        "heads; patching costs L x H passes per prompt and knockout T^2 / 2, so their ratios grow with the model "
        "and the prompt. The paper's ~100x compares its routes (5 s) with ACDC (8 min, GPU, GPT-2 small, 50 IOI "
        "prompts): ACDC patches *edges* iteratively and is not a per-head sweep, so the numbers are not the same "
        "measurement."
    )
    out.append(
        f"- **Timings are {device} timings** with {m['torch_threads']} torch threads on a shared machine (see the "
        "load average above). When other processes compete for the cores, the routes (many small operations, "
        "each a parallel region of every thread) slow down more than the large batched passes of the baselines, "
        "so a busy machine understates the ratios. Read the ratios as this machine's, not as constants."
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
        f"- **EAP.** Attribution patching shares {h['overlap_eap_vs_patching']} of its top {h['top']} heads with "
        f"exact patching (Spearman {_f(h['spearman_eap_vs_patching'], 2)}) at {_f(t['eap_s'] / t['patching_s'] * 100, 1)}% "
        "of its time: it is the first-order estimate of the same intervention, so it agrees with patching by "
        "construction where the model is close to linear in a head's output, and it is a stand-in for patching, "
        f"not an independent check of it. Against the routes' contrastive difference: {h['overlap_diff_vs_eap']} of "
        f"{h['top']} (Spearman {_f(h['spearman_diff_vs_eap'], 2)}). The routes need no corrupted prompt for the "
        "plain frequency and no gradient; EAP needs a twin and a backward pass, and scores heads (or edges) for "
        "one metric only."
    )
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
            "the contrastive ranking discounts. The patching and EAP curves are not independent checks: "
            "replacing a head by its mean over ABC twins is close to the very intervention patching ranked the "
            "heads by (identical where a template group holds only the prompt's own twin), and EAP estimates it. Ablation measures necessity "
            f"under a distribution shift ({fa['ablation']}-ablation) and downstream heads can compensate "
            "(self-repair), so a small drop does not prove a head unused."
        )
    out.append(
        "- **What patching sees.** Patching from the ABC twin only finds heads whose output differs between the "
        "prompt and its twin; the paper's point that the result depends on the contrastive template is not "
        "tested here (one twin per prompt)."
    )
    return out


def print_summary(summary: dict, file=None) -> None:
    file = file or sys.stdout
    t, h, m = summary["timing"], summary["heads"], summary["machine"]
    r = t["ratios"]
    print(
        f"routes (batched) {t['routes_batched_s']:.2f} s | patching {t['patching_s']:.1f} s ({r['patching']:.1f}x) | "
        f"knockout {t['knockout_s']:.1f} s ({r['knockout']:.1f}x) | EAP {t['eap_s']:.2f} s ({r['eap']:.1f}x) | "
        f"routes one at a time {t['routes_s']:.2f} s | load average {_f(m.get('load_average_start'), 1)} -> "
        f"{_f(m.get('load_average_end'), 1)} | top-{h['top']} overlap {h['overlap_diff_vs_patching']}/{h['top']} | "
        f"Spearman {_f(h['spearman_diff_vs_patching'], 2)}",
        file=file,
    )
    print(f"report: {summary['report']}", file=file)
