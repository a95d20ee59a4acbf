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
# # Bottom-to-top patterns, previous-token and subword-merging heads (paper figure 9, appendix D)
#
# Ferrando & Voita (2024), sections 4.2 and 4.3, on the general domain (C4 in the paper and in the shipped
# config). **Figure 9a**: each head's activation frequency at tau = 0.01 — the share of predictions whose
# route contains at least one of its sub-edges — with only the most important half of the heads drawn
# (as in the paper), and under it each layer's mean FFN importance. Rings mark head roles, defined on
# importances rather than attention weights:
#
# * **previous-token head** (yellow): in at least 70% of predictions it puts more than half of its
#   influence on the previous token;
# * **subword-merging head** (red): not a previous-token head; in at least 70% of later-subword
#   predictions more than half of its influence comes from earlier subwords of the same word, *and* in at
#   least 70% of first-subword predictions its total influence is at most 0.005%.
#
# The job computed these fractions (`tables/head_roles`); the second figure shows them for every head so
# you can see how close heads come to the 70% lines. The paper's Llama-2 findings: activation and FFN
# importance are high at the bottom and fall towards the top, the last FFN is very important, there are
# several previous-token heads and they are the most important heads of their layers, and several
# subword-merging heads sit in the bottom layers.
#
# **Figure 9b / appendix D**: predictions at the first period of a text. In Llama 2 their residual stream
# ignores almost every block between the first and last few layers (it acts like a second BOS token).
# The last figure compares their per-layer attention and FFN importance with all other predictions.

# %% tags=["parameters"]
import os

RUN = os.environ.get("FLOWRAY_RUN", "runs/shared_data")  # a run directory or a bucket URI
FIGURES = os.environ.get("FLOWRAY_FIGURES", "out/figures")
DOMAIN = None  # None: the run's general domain
TAU = 0.01  # the paper's; the run's closest tau is used
TOP_FRACTION = 0.5  # draw only this share of heads, the most important ones (the paper shows the top 50%)
ROLE_DOMAIN = None  # where head roles are judged: None = DOMAIN; "*all*" = every domain together

# %%
import sys

sys.path.insert(0, "analysis" if os.path.isfile("analysis/common.py") else ".")
import common
import matplotlib.pyplot as plt
import numpy as np
import polars as pl

from flowray.errors import InputError
from flowray.tables import tau_columns

run = common.open_run(RUN)
L, H = run.n_layers, run.n_heads
domain = DOMAIN or run.general
role_domain = ROLE_DOMAIN or domain
tau = run.closest_tau(TAU)
print(run.describe())
print(f"domain {domain!r}, tau {tau:g} (asked for {TAU:g}), roles judged on {role_domain!r}")

activation = run.table("head_activation").filter((pl.col("domain") == domain) & (pl.col("tau") == tau)).collect()
importance = run.table("component_importance").filter(pl.col("domain") == domain).collect()
ffn_act = run.table("ffn_activation").filter((pl.col("domain") == domain) & (pl.col("tau") == tau)).collect()
roles = run.table("head_roles").filter(pl.col("domain") == role_domain).collect()
if activation.is_empty():
    raise InputError(f"DOMAIN: no head_activation rows for domain {domain!r}; expected one of {run.domains}")

freq = common.grid(activation, "frequency", L, H)  # [L, H]
head_imp = common.grid(importance.filter(pl.col("component") == "head"), "importance", L, H)  # [L, H]
ffn_imp = importance.filter(pl.col("component") == "ffn").sort("layer")["importance"].to_numpy()  # [L]
ffn_freq = ffn_act.sort("layer")["frequency"].to_numpy()  # [L]
n_pred = int(activation["n_predictions"][0])
cut = np.nanquantile(head_imp, 1 - TOP_FRACTION)
shown = np.where(head_imp >= cut, freq, np.nan)
role_heads = {r: [(row["layer"], row["head"]) for row in roles.filter(pl.col("role") == r).iter_rows(named=True)]
              for r in common.ROLE_COLOURS}
print(f"{n_pred} predictions; heads drawn: {int(np.isfinite(shown).sum())} of {L * H}")
print({r: [common.head_name(*h) for h in hs] for r, hs in role_heads.items()})

# %%
fig, (ax, ax_ffn) = plt.subplots(2, 1, figsize=(9, 6.2), sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
common.plot_head_grid(ax, shown, vmin=0, vmax=1, cmap="viridis", label="activation frequency",
                      title=f"(a) {domain}: head activation frequency, tau = {tau:g} "
                            f"(top {TOP_FRACTION:.0%} heads by importance), n = {n_pred}")
for role, colour in common.ROLE_COLOURS.items():
    common.mark_heads(ax, role_heads[role], colour=colour, size=70, lw=2,
                      label=f"{role.replace('_', '-')} ({len(role_heads[role])})")
ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
ax.set_xlabel("")
layers = np.arange(L)
ax_ffn.bar(layers, ffn_imp, color="#555555", label="FFN importance (mean)")
ax_ffn.plot(layers, np.nansum(head_imp, 1), color="#1f77b4", marker=".", lw=1,
            label="all heads' importance (sum, mean)")
ax_ffn.set_ylabel("importance", fontsize=9)
ax_ffn.set_xlabel("layer")
ax_ffn.legend(fontsize=8, frameon=False)
ax_ffn.tick_params(labelsize=7)
# the colorbar narrows the grid; give the FFN axes the same width so layers line up
fig.canvas.draw()
pos_grid, pos_ffn = ax.get_position(), ax_ffn.get_position()
ax_ffn.set_position([pos_ffn.x0, pos_ffn.y0, pos_grid.width, pos_ffn.height])
fig.suptitle(f"Bottom-to-top patterns — {run.model_spec}", fontsize=11)
common.save_figure(fig, FIGURES, "fig9a_bottom_to_top")

# %% [markdown]
# ## Bottom vs top, and the roles' standing in their layers
# The paper's claims as numbers: mean head activation frequency and FFN importance per third of the
# network, the last FFN against the others, and for each role head its rank by importance in its layer.

# %%
# bottom / middle / top thirds of the layers (fewer parts for a model with fewer than 3 layers)
thirds = {name: idx for name, idx in zip(("bottom", "middle", "top"), np.array_split(np.arange(L), 3)) if idx.size}
print("mean head activation frequency / FFN importance / FFN activation frequency by third of the layers:")
for name, idx in thirds.items():
    print(f"  {name:6s} layers {idx[0]:>2}-{idx[-1]:<2}: {np.nanmean(freq[idx]):.3f} / "
          f"{ffn_imp[idx].mean():.3f} / {ffn_freq[idx].mean():.3f}")
print(f"last-layer FFN importance {ffn_imp[-1]:.3f}; median over the other layers {np.median(ffn_imp[:-1]):.3f}; "
      f"rank of the last FFN among the {L} FFNs: {int((ffn_imp > ffn_imp[-1]).sum()) + 1}")

rank_in_layer = (-np.nan_to_num(head_imp, nan=-1)).argsort(1).argsort(1) + 1  # 1 = most important in its layer
role_rows = []
for role, heads in role_heads.items():
    for layer, head in heads:
        r = roles.filter((pl.col("layer") == layer) & (pl.col("head") == head)).row(0, named=True)
        others = np.delete(head_imp[layer], head)
        role_rows.append({"role": role, "head": common.head_name(layer, head), "importance": head_imp[layer, head],
                          "rank_in_layer": int(rank_in_layer[layer, head]),
                          "x_next_best_in_layer": head_imp[layer, head] / max(np.nanmax(others), 1e-12),
                          "activation_freq": freq[layer, head], "prev_fraction": r["previous_token_fraction"],
                          "merge_fraction": r["subword_merging_fraction"],
                          "first_silent_fraction": r["first_subword_silent_fraction"]})
role_table = pl.DataFrame(role_rows) if role_rows else pl.DataFrame()
with pl.Config(tbl_rows=50, tbl_cols=-1, float_precision=3, tbl_width_chars=200):
    print(role_table if role_rows else "no previous-token or subword-merging heads in this domain")

# %% [markdown]
# ## How close each head comes to the role criteria
# Left: share of predictions where the head puts more than half of its influence on the previous token,
# against its mean importance. Middle and right: the two subword-merging criteria, with silence measured on
# raw importances (the job's `role`) and after pruning at tau (every part <= tau dropped, a node's kept
# parts rescaled to sum to 1: a head is then either absent, 0, or above tau). Dashed lines: the 70%
# thresholds. Denominators: previous-token cases are predictions whose previous token is a text token
# (not the BOS); later-subword cases are tokens of a word that are not its first token (whitespace and the
# BOS belong to no word and count in neither set); a head with zero influence in a case counts as a failure.

# %%
prev_frac = common.grid(roles, "previous_token_fraction", L, H).ravel()
merge_frac = common.grid(roles, "subword_merging_fraction", L, H).ravel()
silent_frac = common.grid(roles, "first_subword_silent_fraction", L, H).ravel()
pruned_col = tau_columns(tau).silent_fraction_pruned
pruned_frac = (common.grid(roles, pruned_col, L, H).ravel() if pruned_col in roles.columns
               else np.full(L * H, np.nan))  # runs made before silence was also measured after pruning
role_of = {h: r for r, hs in role_heads.items() for h in hs}
colours = [common.ROLE_COLOURS.get(role_of.get((i // H, i % H)), "#999999") for i in range(L * H)]
fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.2))
a1.scatter(prev_frac, head_imp.ravel(), s=12, c=colours)
a1.axvline(0.7, ls="--", c="k", lw=0.8)
a1.set_xlabel("previous-token fraction (> half of influence on pos-1)")
a1.set_ylabel("mean head importance")
a2.scatter(merge_frac, silent_frac, s=12, c=colours)
a2.axvline(0.7, ls="--", c="k", lw=0.8)
a2.axhline(0.7, ls="--", c="k", lw=0.8)
a2.set_xlabel("later subwords: > half of influence from the same word")
a2.set_ylabel("first subwords: influence <= 0.005%")
a2.set_title("silence on raw importances (the role)", fontsize=9)
a3.scatter(merge_frac, pruned_frac, s=12, c=colours)
a3.axvline(0.7, ls="--", c="k", lw=0.8)
a3.axhline(0.7, ls="--", c="k", lw=0.8)
a3.set_xlabel("later subwords: > half of influence from the same word")
a3.set_ylabel(f"first subwords: no kept part at tau = {tau:g}")
a3.set_title(f"silence after pruning at tau = {tau:g}", fontsize=9)
for i in np.argsort(-np.nan_to_num(merge_frac))[:5]:
    a2.annotate(common.head_name(i // H, i % H), (merge_frac[i], silent_frac[i]), fontsize=7)
    a3.annotate(common.head_name(i // H, i % H), (merge_frac[i], pruned_frac[i]), fontsize=7)
fig.suptitle(f"Head-role criteria ({role_domain}; yellow: previous-token, red: subword-merging)", fontsize=10)
fig.tight_layout()
common.save_figure(fig, FIGURES, "fig9_role_criteria")
print(f"closest to subword merging (merge fraction, first-subword silent fraction raw / pruned at {tau:g}):")
for i in np.argsort(-np.nan_to_num(merge_frac))[:5]:
    print(f"  {common.head_name(i // H, i % H)}: {merge_frac[i]:.3f}, {silent_frac[i]:.3f} / {pruned_frac[i]:.3f}")
both = (merge_frac >= 0.7) & (pruned_frac >= 0.7) & (prev_frac < 0.7)
print(f"heads meeting both criteria with pruned silence at tau = {tau:g}: "
      f"{[common.head_name(i // H, i % H) for i in np.flatnonzero(both)] or 'none'}")
cases = roles.select("cases_previous", "cases_later_subword", "cases_first_subword").row(0, named=True)
print(f"cases: {cases}")

# %% [markdown]
# ## Appendix D: the first period of a text
# Predictions whose input token is the text's first "." against all other predictions of the domain:
# per layer, the summed importance of all heads and the FFN importance.

# %%
preds = (run.predictions().filter(pl.col("target") & (pl.col("domain") == domain))
         .select("doc_id", "position", "token", "component_importance"))
first_period = (preds.filter(pl.col("token").str.strip_chars() == ".")
                .group_by("doc_id").agg(pl.col("position").min().alias("position")))
# only the first-period rows are read; the other predictions' mean follows from the domain's mean
# importance in tables/component_importance (mean over all n target predictions of the domain)
width = L * H + L
first_rows = preds.join(first_period, on=["doc_id", "position"], how="semi").collect()
k = first_rows.height
first_mean = (first_rows["component_importance"].list.to_array(width).to_numpy().astype(np.float64).mean(0)
              if k else np.full(width, np.nan))  # [L*H + L]
all_mean = np.concatenate([np.nan_to_num(head_imp).ravel(), ffn_imp])  # [L*H + L], same layout
other_mean = (n_pred * all_mean - k * np.nan_to_num(first_mean)) / max(n_pred - k, 1)


def layer_profile(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum of the heads' importance per layer ``[L]``, FFN importance ``[L]``) from a component vector."""
    return v[: L * H].reshape(L, H).sum(1), v[L * H:]


groups = {"first period": (first_mean, k), "other predictions": (other_mean, n_pred - k)}
print({name: n for name, (_, n) in groups.items()})
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
for (name, (mean, n)), style in zip(groups.items(), ("-o", "-s")):
    if n:
        heads, ffn = layer_profile(mean)
        axes[0].plot(layers, heads, style, ms=3, label=f"{name} (n={n})")
        axes[1].plot(layers, ffn, style, ms=3, label=f"{name} (n={n})")
axes[0].set_title("attention: sum of head importances", fontsize=10)
axes[1].set_title("FFN importance", fontsize=10)
for a in axes:
    a.set_xlabel("layer")
    a.legend(fontsize=8, frameon=False)
axes[0].set_ylabel("mean importance")
fig.suptitle(f"(b) first period of a text vs other predictions ({domain}) — {run.model_spec}", fontsize=11)
fig.tight_layout()
common.save_figure(fig, FIGURES, "fig9b_first_period")

for name, (mean, n) in groups.items():
    if n:
        heads, ffn = layer_profile(mean)
        print(f"{name:17s} (n={n}): attention / FFN importance, mean over layers — "
              + ", ".join(f"{part} {heads[idx].mean():.3f} / {ffn[idx].mean():.3f}"
                          for part, idx in thirds.items()))
