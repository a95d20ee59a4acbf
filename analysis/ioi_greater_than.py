# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # IOI and greater-than: head activation frequency, original vs contrastive (paper figures 6 and 7)
#
# Ferrando & Voita (2024), section 3. For every task prompt the job extracted the information flow route
# of the **last-position prediction** (the indirect object for IOI, the end year's next digit for
# greater-than) and recorded which attention heads have at least one sub-edge in it. A head's *activation
# frequency* at threshold tau is the share of prompts whose route contains it. The paper uses tau = 0.03;
# this notebook takes the run's tau closest to `TAU`.
#
# How to read the figures (one per task; layers left to right, heads bottom to top):
#
# * **top row**: activation frequency for the original prompts and for each contrastive twin
#   (IOI: the "ABC" twin with a third name instead of the repeated subject; greater-than: YY = 01,
#   Hanna et al.'s baseline, and YY = 00 when the run has it). Heads near 1 in every panel are the
#   *generic* heads the paper says routes always contain.
# * **bottom row**: original minus twin (red: more active on the task than on the twin). This is the
#   patching-style comparison; the paper's claim is that generic heads cancel here and the task heads stay.
#   Heads whose paired difference is more than 2 standard errors from 0 are ringed in black (a per-head
#   screen, not a test corrected for the many heads: among L*H heads a few rings are expected by chance).
# * rings in colour: heads known for the model from other work (`KNOWN_HEADS`, keyed by the run's model
#   spec) — for SmolLM2 the heads that move " Mary" to the last position in the
#   route of the project README's IOI example (`docs/route_ioi.png`).
#
# The greater-than prediction follows `flowray.tasks`: SmolLM2 writes numbers digit by digit, so
# "…from the year 1732 to the year 17" predicts the end year's *tens digit*; the answer is t + 1 for the
# start year's tens digit t (the smallest always-later digit); t is kept in 1..8.

# %% tags=["parameters"]
import os

RUN = os.environ.get("FLOWRAY_RUN", "runs/shared_data")  # a run directory or a bucket URI
FIGURES = os.environ.get("FLOWRAY_FIGURES", "out/figures")
TAU = 0.03  # the paper's; the run's closest tau is used
ONLY_CORRECT = False  # keep only prompts whose original the model gets right (paired twins follow)
N_TOP = 8  # heads listed per comparison
# Heads reported for a model by other work, keyed by the manifest's model spec: drawn as coloured rings.
KNOWN_HEADS = {
    "smollm2": {"ioi": {"move ' Mary' in the README route": [(23, 0), (23, 7)]}},
    "gpt2": {  # Wang et al. 2023 (IOI), Hanna et al. 2023 (greater-than), GPT-2 small
        "ioi": {"name movers": [(9, 6), (9, 9), (10, 0)], "S-inhibition": [(7, 3), (7, 9), (8, 6), (8, 10)],
                "induction/duplicate": [(5, 5), (6, 9), (0, 1), (3, 0)], "previous token": [(2, 2), (4, 11)]},
        "greater_than": {"greater-than heads": [(5, 1), (5, 5), (6, 1), (6, 9), (7, 10), (8, 8), (8, 11),
                                                (9, 1)]},
    },
}

# %%
import sys

sys.path.insert(0, "analysis" if os.path.isfile("analysis/common.py") else ".")
import common
import matplotlib.pyplot as plt
import numpy as np
import polars as pl

from flowray.tables import tau_columns

run = common.open_run(RUN)
L, H = run.n_layers, run.n_heads
tau = run.closest_tau(TAU)
route = tau_columns(tau).route_heads  # the predictions' column of this tau's routes
pairs = common.task_pairs(run)
print(run.describe())
print(f"tau = {tau:g} (asked for {TAU:g})")
print("task / twin domains:", [(p["original"], p["contrastive"], p["label"]) for p in pairs])
if not pairs:
    print("this run has no task domain with a contrastive twin: nothing to compare")

# %% [markdown]
# ## The prompts and what the model predicts
# Only the last position of a task prompt is a target. `next_token` is the original prompt's answer (for a
# twin too: the job keeps the pair's answer), so `top1_is_answer` on a twin says how often the twin still
# predicts the original's answer. Greater-than counts as right (`correct`) when the predicted tens digit is
# larger than the start year's (t = answer − 1): `later` / `same` / `earlier` split the predictions, and
# `uniform_digit_chance` is what a uniformly random digit would score. Token texts come from the run's
# own tokens (a predicted id never seen as an input token counts as "not a digit"). On a twin the digit
# columns compare with the *original's* t, not the twin's YY.

# %%
preds = run.predictions()
vocab = (preds.select(pl.col("token_id").alias("predicted_id"), pl.col("token").alias("predicted"))
         .unique("predicted_id"))
task_domains = sorted({p["original"] for p in pairs} | {p["contrastive"] for p in pairs})
last = (preds.filter(pl.col("target") & pl.col("domain").is_in(task_domains))
        .select("domain", "doc_id", "next_token_id", "next_token", "predicted_id", route)
        .join(vocab, on="predicted_id", how="left")
        .with_columns((pl.col("predicted_id") == pl.col("next_token_id")).alias("top1_is_answer"))
        .collect())


def digit_order(df: pl.DataFrame) -> pl.Series:
    """Greater-than: the predicted digit against the start year's tens digit t = answer - 1:
    "later" (> t, the end year is always later), "same" (= t, depends on the ones digit), "earlier"
    (< t, always wrong), "not a digit"."""
    t = df["next_token"].str.strip_chars().cast(pl.Int32, strict=False) - 1
    guess = df["predicted"].str.strip_chars().cast(pl.Int32, strict=False)
    return (pl.select(pl.when(guess.is_null() | t.is_null()).then(pl.lit("not a digit"))
                      .when(guess > t).then(pl.lit("later")).when(guess == t).then(pl.lit("same"))
                      .otherwise(pl.lit("earlier")).alias("order")).to_series())


task_of = {p["original"]: p["task"] for p in pairs} | {p["contrastive"]: p["task"] for p in pairs}
last = last.with_columns(pl.col("domain").replace_strict(task_of).alias("task"), digit_order(last))
last = last.with_columns(pl.when(pl.col("task") == "greater_than").then(pl.col("order")).alias("order"))
last = last.with_columns(pl.when(pl.col("task") == "greater_than").then(pl.col("order") == "later")
                         .otherwise(pl.col("top1_is_answer")).alias("correct"))
# a digit drawn uniformly from 0-9 is "later" with probability (9 - t) / 10
chance = (last.filter(pl.col("task") == "greater_than")
          .group_by("domain").agg(((9 - (pl.col("next_token").str.strip_chars().cast(pl.Int32) - 1)) / 10)
                                  .mean().alias("uniform_digit_chance")))
accuracy = (last.group_by("domain").agg(
    pl.len().alias("prompts"), pl.col("top1_is_answer").mean(), pl.col("correct").mean(),
    *[(pl.col("order") == o).mean().alias(o) for o in ("later", "same", "earlier")])
    .join(chance, on="domain", how="left").sort("domain"))
with pl.Config(float_precision=3, tbl_cols=-1, tbl_width_chars=200):
    print(accuracy)

# %% [markdown]
# ## Head activation frequency, paired by prompt
# A twin shares its original's `doc_id` (`{task}:{index}`), so the difference is computed per pair: the
# standard error of the mean paired difference tells which differences the sample size can resolve.

# %%
def presence(domain: str, docs: list[str]) -> np.ndarray:
    """``[len(docs), L*H]`` 0/1: the head is in the route of that prompt's target prediction."""
    rows = last.filter(pl.col("domain") == domain).select("doc_id", route)
    index = {d: i for i, d in enumerate(docs)}
    out = np.zeros((len(docs), L * H))
    for doc, heads in rows.iter_rows():
        if doc in index and heads is not None:
            out[index[doc], list(heads)] = 1.0
    return out


def docs_of(domain: str) -> set[str]:
    rows = last.filter(pl.col("domain") == domain)
    if ONLY_CORRECT:
        rows = rows.filter(pl.col("correct"))
    return set(rows["doc_id"].to_list())


comparisons = []
for p in pairs:
    docs = sorted(docs_of(p["original"]) & set(last.filter(pl.col("domain") == p["contrastive"])["doc_id"]))
    a, b = presence(p["original"], docs), presence(p["contrastive"], docs)
    d = a - b
    se = d.std(0, ddof=1) / np.sqrt(max(len(docs), 1)) if len(docs) > 1 else np.full(L * H, np.nan)
    comparisons.append({**p, "n": len(docs), "original_freq": a.mean(0).reshape(L, H),
                        "twin_freq": b.mean(0).reshape(L, H), "diff": d.mean(0).reshape(L, H),
                        "se": se.reshape(L, H)})
    print(f"{p['original']} vs {p['contrastive']} ({p['label']}): {len(docs)} paired prompts")

# the same frequencies the job's reduce wrote (all prompts): a check that this notebook reads routes right
table = run.table("head_activation").filter(pl.col("tau") == tau).collect()
if not ONLY_CORRECT:
    for c in comparisons:
        if 0 < c["n"] == last.filter(pl.col("domain") == c["original"]).height:
            ref = common.grid(table.filter(pl.col("domain") == c["original"]), "frequency", L, H)
            assert np.allclose(ref, c["original_freq"], atol=1e-6), "predictions and head_activation disagree"

# %%
def known_for(task: str) -> dict:
    """KNOWN_HEADS for the run's model: by its spec, or by the spec's last part ("openai-community/gpt2")."""
    spec = run.model_spec
    entry = KNOWN_HEADS.get(spec) or KNOWN_HEADS.get(spec.rstrip("/").rsplit("/", 1)[-1].lower(), {})
    return entry.get(task, {})


KNOWN_COLOURS = ["#00bfff", "#ff7f0e", "#2ca02c", "#e377c2", "#8c564b"]


def plot_task(task: str, comps: list[dict]):
    n = len(comps)
    fig, axes = plt.subplots(2, n + 1, figsize=(3.6 * (n + 1), 5.6), squeeze=False)
    original = comps[0]
    common.plot_head_grid(axes[0, 0], original["original_freq"], vmin=0, vmax=1, cmap="viridis",
                          title=f"{original['original']} (n={original['n']})", label="frequency")
    axes[1, 0].axis("off")
    for i, c in enumerate(comps, start=1):
        common.plot_head_grid(axes[0, i], c["twin_freq"], vmin=0, vmax=1, cmap="viridis",
                              title=f"{c['contrastive']} ({c['label']})", label="frequency")
        ax = axes[1, i]
        common.plot_head_grid(ax, c["diff"], vmin=-1, vmax=1, cmap="RdBu_r",
                              title=f"original − {c['label']}", label="difference")
        resolved = np.argwhere(np.abs(c["diff"]) > 2 * np.nan_to_num(c["se"], nan=np.inf))
        common.mark_heads(ax, [tuple(x) for x in resolved], colour="black", size=30, lw=0.8,
                          label="|diff| > 2 SE", outline=False)
    for ax in axes.ravel():
        if not ax.axison:
            continue
        for (name, heads), colour in zip(known_for(task).items(), KNOWN_COLOURS):
            common.mark_heads(ax, [h for h in heads if h[0] < L and h[1] < H], colour=colour, label=name)
    handles, labels = [], []
    for ax in axes.ravel():
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:  # in the empty cell under the original's map
        axes[1, 0].legend(handles, labels, loc="center", fontsize=8, frameon=False)
    fig.suptitle(f"{task}: head activation frequency, tau = {tau:g} — {run.model_spec}", fontsize=11)
    fig.tight_layout()
    return fig


for task in dict.fromkeys(c["task"] for c in comparisons):
    fig = plot_task(task, [c for c in comparisons if c["task"] == task])
    common.save_figure(fig, FIGURES, f"fig{6 if task == 'ioi' else 7}_{task}_activation")

# %% [markdown]
# ## What changes between original and twin
# For each comparison: the heads with the largest positive difference (task heads), how many heads are
# generic (frequency >= 0.9 on both sides) and the total variation between the two frequency maps
# (mean |difference| over heads: near 0 means the twin's routes look like the task's).

# %%
rows = []
for c in comparisons:
    generic = (c["original_freq"] >= 0.9) & (c["twin_freq"] >= 0.9)
    for layer, head, diff in common.top_heads(c["diff"], N_TOP):
        rows.append({"original": c["original"], "twin": c["label"], "head": common.head_name(layer, head),
                     "original_freq": c["original_freq"][layer, head], "twin_freq": c["twin_freq"][layer, head],
                     "difference": diff, "se": c["se"][layer, head]})
    print(f"{c['original']} vs {c['label']}: {int(generic.sum())} generic heads (>= 0.9 in both), of "
          f"{int((c['original_freq'] >= 0.9).sum())} with >= 0.9 on the task; mean |difference| "
          f"{np.abs(c['diff']).mean():.3f}; heads with |diff| > 2 SE: "
          f"{int((np.abs(c['diff']) > 2 * np.nan_to_num(c['se'], nan=np.inf)).sum())}")
top = pl.DataFrame(rows)
with pl.Config(tbl_rows=100, float_precision=3):
    print(top)

# %% [markdown]
# ## A continuous contrast: the source sub-edge, original minus twin
# Activation frequency is binary and saturates at 1.0 for generic heads. The job also records, at the
# prediction under study, each head's importance of the sub-edges *from* the indirect object (IOI) or
# from the start year's YY tokens (greater-than) *to* the last position (`source_edge_importance`), and the
# reduce pairs every prompt with its twin (`tables/contrastive_edges`: mean of original − twin over the
# pairs, with its standard error). On the ABC twin the indirect object is the same token at the same
# position, so a head that moves it *because of the IOI structure* loses importance there; on the YY twins
# the source tokens are "01" / "00" instead of the start year's digits. Top row: the mean importance on
# the original prompts and on each twin; bottom row: the paired difference, ringed where it is beyond 2
# standard errors and at least a tenth of the largest difference.

# %%
edges = run.table("contrastive_edges").collect() if "contrastive_edges" in run.manifest["tables"] else pl.DataFrame()
if edges.is_empty():
    print("this run has no contrastive_edges table (made before the job measured source sub-edges, or no twins)")
edge_rows = []
for task in dict.fromkeys(p["task"] for p in pairs):
    mine = [p for p in pairs if p["task"] == task]
    found = [(p, edges.filter((pl.col("domain") == p["original"]) & (pl.col("contrastive_domain") == p["contrastive"])))
             for p in mine] if not edges.is_empty() else []
    found = [(p, e) for p, e in found if e.height]
    if not found:
        continue
    fig, axes = plt.subplots(2, len(found) + 1, figsize=(4.0 * (len(found) + 1), 5.6), squeeze=False)
    first = found[0][1]
    vmax = max(float(e.select(pl.max_horizontal(pl.col("original").max(), pl.col("contrastive").max())).item())
               for _, e in found)
    common.plot_head_grid(axes[0, 0], common.grid(first, "original", L, H), vmin=0, vmax=vmax, cmap="viridis",
                          label="importance", title=f"{found[0][0]['original']} (n={int(first['n_pairs'][0])})")
    axes[1, 0].axis("off")
    for i, (p, e) in enumerate(found, start=1):
        orig = common.grid(e, "original", L, H)
        diff = common.grid(e, "difference", L, H)
        se = common.grid(e, "se", L, H)
        n = int(e["n_pairs"][0])
        common.plot_head_grid(axes[0, i], common.grid(e, "contrastive", L, H), vmin=0, vmax=vmax, cmap="viridis",
                              label="importance", title=f"{p['contrastive']} ({p['label']})")
        lim = float(np.nanmax(np.abs(diff))) or 1.0
        common.plot_head_grid(axes[1, i], diff, vmin=-lim, vmax=lim, cmap="RdBu_r", label="difference",
                              title=f"original − {p['label']}")
        # rings: beyond 2 standard errors *and* at least a tenth of the largest difference (near-zero heads
        # have near-zero standard errors, so 2 SE alone would ring differences too small to matter)
        resolved = np.argwhere((np.abs(diff) > 2 * np.nan_to_num(se, nan=np.inf)) & (np.abs(diff) >= 0.1 * lim))
        common.mark_heads(axes[1, i], [tuple(x) for x in resolved], colour="black", size=30, lw=0.8,
                          label="|diff| > 2 SE and >= 10% of max", outline=False)
        for layer, head, d in common.top_heads(diff, N_TOP):
            edge_rows.append({"original": p["original"], "twin": p["label"], "head": common.head_name(layer, head),
                              "original_importance": orig[layer, head], "twin_importance": orig[layer, head] - d,
                              "difference": d, "se": se[layer, head], "z": d / se[layer, head] if se[layer, head] else np.nan})
        beyond = int((np.abs(diff) > 2 * np.nan_to_num(se, nan=np.inf)).sum())
        print(f"{p['original']} vs {p['label']}: {n} pairs; heads with |diff| > 2 SE: {beyond}, of which "
              f"{len(resolved)} at >= 10% of the largest |diff| ({lim:.4f}); summed over heads {np.nansum(orig):.3f} "
              f"on the original, {np.nansum(orig - diff):.3f} on the twin")
    fig.suptitle(f"{task}: sub-edge importance from the {'indirect object' if task == 'ioi' else 'start year YY'} "
                 f"to the last position — {run.model_spec}", fontsize=11)
    fig.tight_layout()
    common.save_figure(fig, FIGURES, f"fig{6 if task == 'ioi' else 7}b_{task}_source_edge_contrast")
with pl.Config(tbl_rows=100, tbl_cols=-1, float_precision=4, tbl_width_chars=200):
    print(pl.DataFrame(edge_rows) if edge_rows else "no source sub-edge contrasts to show")

# %% [markdown]
# ## Known heads
# Where the model has heads known from other work, their frequencies on each side.

# %%
known_rows = []
for c in comparisons:
    for name, heads in known_for(c["task"]).items():
        for layer, head in heads:
            if layer < L and head < H:
                known_rows.append({"twin": f"{c['original']} vs {c['label']}", "group": name,
                                   "head": common.head_name(layer, head),
                                   "original_freq": c["original_freq"][layer, head],
                                   "twin_freq": c["twin_freq"][layer, head], "difference": c["diff"][layer, head]})
with pl.Config(tbl_cols=-1, tbl_width_chars=200, float_precision=3):
    print(pl.DataFrame(known_rows) if known_rows else f"no known heads listed for model {run.model_spec!r}")
