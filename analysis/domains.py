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
# # Domain-specific heads and FFNs (paper figure 10, appendix E figure 16)
#
# Ferrando & Voita (2024), section 5.1. For every domain, the mean importance of each head
# (`sum_j e^h_{pos,j}`) and of each layer's FFN over the domain's target predictions (every position of a
# text; the last position of a task prompt), from the job's `tables/component_importance`.
#
# How to read the figures (layers left to right, heads bottom to top):
#
# * **importance maps**: the general domain shows every head; the other domains show only heads whose
#   importance is above `THRESHOLD`. The paper uses a fixed 0.015 for Llama 2-7B; an absolute value does
#   not carry over between models (SmolLM2's 9 heads per layer share more of a layer than Llama's 32), so
#   the default is the general domain's 90th percentile of head importance: a head is drawn when it would
#   be among the general domain's top 10%. Ringed: heads the job flags as
#   specialised (`tables/domain_specialisation`: at least 2x the general importance and among the
#   domain's top 5% heads). The last panel is each domain's FFN importance per layer.
# * **difference maps**: domain minus general — red heads are important for the domain but not in general.
#
# The paper's Llama-2 findings: generally unimportant heads become highly relevant for specific domains
# (addition heads with low C4 scores), the specialised heads differ between addition, code and
# non-English, and the last-layer FFN matters much less for non-English text.
#
# Sample sizes matter here: a text domain contributes every position (thousands of predictions from 40
# texts in the shipped config), a task domain one prediction per prompt (40). Predictions of one text are
# not independent, so the standard errors below are computed over texts.

# %% tags=["parameters"]
import os

RUN = os.environ.get("FLOWRAY_RUN", "runs/shared_data")  # a run directory or a bucket URI
FIGURES = os.environ.get("FLOWRAY_FIGURES", "out/figures")
# None: the general domain, every text domain, and the task domains that are not section 3's IOI /
# greater-than (addition, subtraction); or an explicit list of domain names
DOMAINS = None
THRESHOLD = None  # None: the general domain's THRESHOLD_QUANTILE of head importance; or a number (paper: 0.015)
THRESHOLD_QUANTILE = 0.9
N_TOP = 5  # heads listed per domain
N_SPECIFIC = 10  # heads per domain compared across domains (overlap matrix)

# %%
import sys

sys.path.insert(0, "analysis" if os.path.isfile("analysis/common.py") else ".")
import common
import matplotlib.pyplot as plt
import numpy as np
import polars as pl

from flowray.errors import InputError

run = common.open_run(RUN)
L, H = run.n_layers, run.n_heads
general = run.general
SECTION3_TASKS = {"ioi", "greater_than"}
if DOMAINS is None:
    domains = [general] + [d for d in run.domains if d != general and not (
        run.is_task(d) and (run.corpus(d)["source"]["task"] in SECTION3_TASKS
                            or run.corpus(d)["source"].get("variant") != "original"))]
else:
    domains = [general] + [d for d in DOMAINS if d != general]
missing = [d for d in domains if d not in run.manifest["domains"]]
if missing:
    raise InputError(f"DOMAINS: {missing} are not in this run; it has {sorted(run.manifest['domains'])}")
print(run.describe())

importance = run.table("component_importance").filter(pl.col("domain").is_in(domains)).collect()
spec = run.table("domain_specialisation").filter(pl.col("domain").is_in(domains)).collect()
sizes = run.table("domain_summary").filter(pl.col("domain").is_in(domains)).collect()
heads = {d: common.grid(importance.filter((pl.col("domain") == d) & (pl.col("component") == "head")),
                        "importance", L, H) for d in domains}  # domain -> [L, H]
ffn = {d: importance.filter((pl.col("domain") == d) & (pl.col("component") == "ffn")).sort("layer")["importance"]
       .to_numpy() for d in domains}  # domain -> [L]
threshold = THRESHOLD if THRESHOLD is not None else float(np.nanquantile(heads[general], THRESHOLD_QUANTILE))
print("domains:", domains, f"threshold {threshold:.4f}")
specialised = {d: [(r["layer"], r["head"]) for r in spec.filter((pl.col("domain") == d) & pl.col("specialised"))
                   .iter_rows(named=True)] for d in domains}
print(sizes.sort("domain"))

# %%
ncols = 3
nrows = -(-(len(domains) + 1) // ncols)
vmax = float(np.nanquantile(np.stack(list(heads.values())), 0.99))
fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 2.7 * nrows), squeeze=False)
n_pred = dict(sizes.select("domain", "target_predictions").iter_rows())
for ax, d in zip(axes.ravel(), domains):
    values = heads[d] if d == general else np.where(heads[d] >= threshold, heads[d], np.nan)
    common.plot_head_grid(ax, values, vmin=0, vmax=vmax, cmap="viridis", label="importance",
                          title=f"{d}{' (general)' if d == general else ''}, n={n_pred.get(d)}")
    common.mark_heads(ax, specialised[d], colour="#d62728", size=40, lw=1.4, label="specialised")
ax_ffn = axes.ravel()[len(domains)]
for d in domains:
    ax_ffn.plot(np.arange(L), ffn[d], marker=".", ms=3, lw=1, label=d)
ax_ffn.set_title("FFN importance per layer", fontsize=10)
ax_ffn.set_xlabel("layer")
ax_ffn.legend(fontsize=6, frameon=False, ncol=2)
for ax in axes.ravel()[len(domains) + 1:]:
    ax.axis("off")
fig.suptitle(f"Mean head importance by domain (non-general: heads >= {threshold:.3f}; red rings: specialised) "
             f"— {run.model_spec}", fontsize=11)
fig.tight_layout()
common.save_figure(fig, FIGURES, "fig10_domains", dpi=90)

# %%
others = [d for d in domains if d != general]
if not others:  # a run with one text domain has nothing to subtract: no empty figure
    print(f"no domain besides {general!r} to compare with: fig10_domain_difference is not drawn")
else:
    ncols = min(3, len(others))
    nrows = -(-len(others) // ncols)
    diffs = {d: heads[d] - heads[general] for d in others}
    lim = float(np.nanmax(np.abs(np.stack(list(diffs.values())))))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 2.7 * nrows), squeeze=False)
    for ax, d in zip(axes.ravel(), others):
        common.plot_head_grid(ax, diffs[d], vmin=-lim, vmax=lim, cmap="RdBu_r", label="difference",
                              title=f"{d} − {general}")
        common.mark_heads(ax, specialised[d], colour="black", size=40, lw=1.0, outline=False)
    for ax in axes.ravel()[len(others):]:
        ax.axis("off")
    fig.suptitle(f"Head importance: domain minus {general} (black rings: specialised) — {run.model_spec}",
                 fontsize=11)
    fig.tight_layout()
    common.save_figure(fig, FIGURES, "fig10_domain_difference", dpi=90)

# %% [markdown]
# ## The most domain-specific heads, with standard errors over texts
# Per domain the `N_TOP` heads with the largest importance difference to the general domain. `se` is the
# standard error of that difference computed from per-text mean importances (texts, not predictions, are
# the independent units).

# %%
preds = run.predictions().filter(pl.col("target"))


def per_text(domain: str, flat_ids: list[int]) -> pl.DataFrame:
    """Per text: mean importance of the given flat head ids (only those columns are read)."""
    cols = [pl.col("component_importance").list.get(i).alias(f"h{i}") for i in flat_ids]
    return (preds.filter(pl.col("domain") == domain).select("doc_id", *cols)
            .group_by("doc_id").mean().collect())


def text_se(frame: pl.DataFrame, column: str) -> float:
    x = frame[column].to_numpy()
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


rows = []
for d in others:
    top = common.top_heads(diffs[d], N_TOP)
    ids = [layer * H + head for layer, head, _ in top]
    mine, gen = per_text(d, ids), per_text(general, ids)
    for (layer, head, diff), i in zip(top, ids):
        se = np.hypot(text_se(mine, f"h{i}"), text_se(gen, f"h{i}"))
        rows.append({"domain": d, "head": common.head_name(layer, head), "importance": heads[d][layer, head],
                     "general": heads[general][layer, head], "difference": diff, "se": se,
                     "ratio": heads[d][layer, head] / heads[general][layer, head],
                     "specialised": (layer, head) in specialised[d], "texts": mine.height})
top_table = pl.DataFrame(rows)
with pl.Config(tbl_rows=200, tbl_cols=-1, tbl_width_chars=200, float_precision=4):
    print(top_table)

# %% [markdown]
# ## Are the specific heads the same across domains?
# Overlap (Jaccard) of each domain's `N_SPECIFIC` heads with the largest positive difference to the
# general domain. The paper finds different heads for addition, code and non-English; related domains
# (FLORES languages, addition and subtraction) are expected to share more.

# %%
sets = {d: {(a, b) for a, b, v in common.top_heads(diffs[d], N_SPECIFIC) if v > 0} for d in others}
jac = np.array([[len(sets[a] & sets[b]) / max(len(sets[a] | sets[b]), 1) for b in others] for a in others])
if others:
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(others), 0.6 + 0.55 * len(others)))
    img = ax.imshow(jac, vmin=0, vmax=1, cmap="Greys")
    ax.set_xticks(range(len(others)), others, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(others)), others, fontsize=8)
    for i in range(len(others)):
        for j in range(len(others)):
            ax.text(j, i, f"{jac[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if jac[i, j] > 0.5 else "black")
    ax.set_title(f"overlap of top-{N_SPECIFIC} domain-specific heads", fontsize=10)
    fig.tight_layout()
    common.save_figure(fig, FIGURES, "fig10_specific_head_overlap", dpi=90)
with pl.Config(float_precision=2, tbl_cols=-1, tbl_width_chars=200):
    print(pl.DataFrame({"domain": others, **{b: jac[:, j] for j, b in enumerate(others)}}))

# %% [markdown]
# ## Language or content? A parallel-corpus control
# FLORES-200 is a parallel corpus: its English, Russian, Italian and Spanish files are translations of the
# same sentences. Against the English FLORES file instead of C4, a head that stands out for a translation
# stands out for its language, not for FLORES' topics. The baseline is found from the config: an English
# text domain read from the same folder as non-English text domains (none: the cell says so).

# %%
def folder(d: str) -> str | None:
    paths = run.corpus(d)["source"].get("paths") or []
    return os.path.dirname(paths[0]) if paths else None


text_domains = [d for d in domains if not run.is_task(d) and folder(d)]
baselines = [d for d in text_domains if run.language(d) == "en" and d != general
             and any(folder(o) == folder(d) and run.language(o) not in ("en", "code") for o in text_domains)]
parallel_rows = []
if baselines:
    base = baselines[0]
    for d in [o for o in text_domains if folder(o) == folder(base) and run.language(o) not in ("en", "code")]:
        for layer, head, diff in common.top_heads(heads[d] - heads[base], N_TOP):
            parallel_rows.append({"domain": d, "head": common.head_name(layer, head), "importance": heads[d][layer, head],
                                  base: heads[base][layer, head], general: heads[general][layer, head],
                                  "difference_vs_" + base: diff, "specialised_vs_general": (layer, head) in specialised[d]})
    with pl.Config(tbl_rows=100, tbl_cols=-1, tbl_width_chars=200, float_precision=4):
        print(pl.DataFrame(parallel_rows))
else:
    print("no English domain shares a source folder with a non-English one: no parallel control in this run")

# %% [markdown]
# ## FFNs: the last layer, and layers that go quiet
# The paper sees the last FFN much less important for non-English, and addition/subtraction FFN importance
# falling to zero in some layers.

# %%
ffn_table = pl.DataFrame({
    "domain": domains,
    "language": [run.language(d) for d in domains],
    "last_ffn": [ffn[d][-1] for d in domains],
    "first_ffn": [ffn[d][0] for d in domains],
    "median_ffn": [float(np.median(ffn[d])) for d in domains],
    "min_ffn": [float(ffn[d].min()) for d in domains],
    "argmin_layer": [int(ffn[d].argmin()) for d in domains],
    "layers_below_0.01": [int((ffn[d] < 0.01).sum()) for d in domains],
})
with pl.Config(float_precision=3, tbl_cols=-1, tbl_width_chars=200):
    print(ffn_table)
