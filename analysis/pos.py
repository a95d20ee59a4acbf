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
# # Component importance by part of speech: t-SNE (paper figure 8)
#
# Ferrando & Voita (2024), section 4.1. Each prediction (a position of an English text) is a vector of
# component importances: for every head `sum_j e^h_{pos,j}` (layer-major), then each layer's FFN
# importance — `L*H + L` numbers, the job's `component_importance` column. The paper projects these
# vectors with t-SNE and colours them by (a) the input token's universal POS tag, (b) the next token's
# tag, (c) whether the input token is the first or a later subword of its word. Its findings for Llama 2:
# function words form tight per-tag clusters while content words mix in one large cloud; the projection
# splits first from later subwords; and it follows the input token's tag more than the next token's.
#
# How to read it: three panels of the same points. Clusters of one colour in (a) but not in (b) mean the
# routes depend on the input token's category; a clean two-colour split in (c) means there are components
# working only for later subwords (see `bottom_to_top.py` for the subword-merging heads).
# Under the pictures, a number for each claim: k-nearest-neighbour accuracy of predicting the label from
# the component vector (5-fold cross-validation, the same points), next to always guessing the most
# common label.
#
# Caveats: tags are NLTK universal tags of whole words (every subword of a word gets its word's tag);
# they exist only for English domains (`pos` is null elsewhere). "Next token" is the next token *of the
# text*, not the model's prediction (as in the paper). The paper uses 1000 C4 texts; here the points are a
# random subsample (`N_POINTS`) of the run's English predictions so t-SNE stays fast.

# %% tags=["parameters"]
import os

RUN = os.environ.get("FLOWRAY_RUN", "runs/shared_data")  # a run directory or a bucket URI
FIGURES = os.environ.get("FLOWRAY_FIGURES", "out/figures")
DOMAINS = None  # None: the general domain (the paper uses C4); or a list such as ["c4", "flores_eng"]
N_POINTS = 3000  # subsample for t-SNE
PERPLEXITY = 30.0  # capped at (points - 1) / 3
TSNE_METHOD = None  # None: "exact" up to 1000 points (fast there, and immune to busy cores), else "barnes_hut"
SEED = 0
K_NEIGHBOURS = 10

# %%
import sys
import warnings

warnings.filterwarnings("ignore", message="The least populated class")  # rare tags in small samples
sys.path.insert(0, "analysis" if os.path.isfile("analysis/common.py") else ".")
import common
import matplotlib.pyplot as plt
import numpy as np
import polars as pl
from sklearn.manifold import TSNE
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from flowray.errors import InputError

run = common.open_run(RUN)
L, H = run.n_layers, run.n_heads
width = L * H + L
domains = DOMAINS or [run.general]
not_english = [d for d in domains if run.language(d) != "en"]
if not_english:
    print(f"note: {not_english} are not English: their predictions have no POS tags and drop out")
print(run.describe())
print("domains:", domains)

# %% [markdown]
# ## The points
# Target predictions with a POS tag for both the input and the next token, subsampled uniformly.

# %%
eligible = (run.predictions()
            .filter(pl.col("target") & pl.col("domain").is_in(domains)
                    & pl.col("pos").is_not_null() & pl.col("next_pos").is_not_null()))
KEY = ["domain", "doc_id", "position"]
# sample on the light key columns first, then read the vectors of the sampled rows only: a cluster run
# has millions of predictions x (L*H + L) floats
keys = eligible.select(KEY).collect()
available = keys.height
keys = keys.sample(min(N_POINTS, available), seed=SEED) if available else keys
points = (eligible.select(*KEY, "token", "pos", "next_pos", "first_subword", "component_importance")
          .join(keys.lazy(), on=KEY, how="semi").collect(engine="streaming").sort(KEY))
print(f"{available} tagged predictions, {points.height} sampled")
if points.height < 10:
    raise InputError(f"too few tagged English predictions in {domains} for a t-SNE: {points.height} (at least 10); "
                     "run the job with more texts per domain, or with the NLTK tagger data for POS tags")
X = points["component_importance"].list.to_array(width).to_numpy().astype(np.float64)  # [N, L*H + L]
subword = np.where(points["first_subword"].to_numpy(), "first subword", "later subword")
labels = {"input token POS": points["pos"].to_numpy(), "next token POS": points["next_pos"].to_numpy(),
          "first vs later subword": subword}
print("input-token tags:", dict(points.group_by("pos").len().sort("len", descending=True).iter_rows()))

# %%
perplexity = min(PERPLEXITY, (points.height - 1) / 3)
method = TSNE_METHOD or ("exact" if points.height <= 1000 else "barnes_hut")
emb = TSNE(n_components=2, perplexity=perplexity, init="pca", method=method,
           random_state=SEED).fit_transform(X)  # [N, 2]

# %%
TAGS = ["NOUN", "VERB", "ADJ", "ADV", "PRON", "DET", "ADP", "CONJ", "PRT", "NUM", ".", "X"]
palette = plt.get_cmap("tab20").colors  # the dark shades first, then two light ones
TAG_COLOURS = {tag: palette[i] for tag, i in zip(TAGS, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 1, 3])}
SUBWORD_COLOURS = {"first subword": "#1f77b4", "later subword": "#d62728"}


def scatter(ax, values, colours, title):
    seen = [v for v in list(colours) + sorted(set(values) - set(colours)) if v in set(values)]
    for v in seen:
        m = values == v
        ax.scatter(emb[m, 0], emb[m, 1], s=4, alpha=0.7, color=colours.get(v, "grey"), label=f"{v} ({m.sum()})",
                   linewidths=0)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=6, markerscale=2.5, loc="best", frameon=False, ncol=2 if len(seen) > 6 else 1)


fig, axes = plt.subplots(1, 3, figsize=(15, 5))
for ax, (name, values), colours, letter in zip(axes, labels.items(), (TAG_COLOURS, TAG_COLOURS, SUBWORD_COLOURS),
                                               "abc"):
    scatter(ax, values, colours, f"({letter}) {name}")
fig.suptitle(f"t-SNE of component importance vectors ({points.height} predictions, {', '.join(domains)}) "
             f"— {run.model_spec}", fontsize=11)
fig.tight_layout()
common.save_figure(fig, FIGURES, "fig8_pos_tsne", dpi=90)

# %% [markdown]
# ## How much of each label the vectors carry
# k-NN accuracy in the full component space (not the 2-D projection) against the majority-label
# baseline, then per input-token tag: how often a point's neighbours share its tag (recall). The paper
# expects function-word tags (DET, ADP, PRON, CONJ, PRT, ".") to be recovered better than content-word
# tags (NOUN, VERB, ADJ, ADV).

# %%
rows = []
folds = max(2, min(5, points.height // 20))
for name, y in labels.items():
    knn = KNeighborsClassifier(n_neighbors=min(K_NEIGHBOURS, points.height // folds))
    scores = cross_val_score(knn, X, y, cv=folds)
    _, counts = np.unique(y, return_counts=True)
    rows.append({"label": name, "classes": len(counts), "knn_accuracy": scores.mean(),
                 "majority_baseline": counts.max() / counts.sum()})
knn_table = pl.DataFrame(rows)
with pl.Config(float_precision=3):
    print(knn_table)

# %%
from sklearn.model_selection import cross_val_predict

y = labels["input token POS"]
guess = cross_val_predict(KNeighborsClassifier(n_neighbors=min(K_NEIGHBOURS, points.height // folds)), X, y,
                          cv=folds)
FUNCTION = ["DET", "ADP", "PRON", "CONJ", "PRT", "."]
CONTENT = ["NOUN", "VERB", "ADJ", "ADV"]
per_tag = (pl.DataFrame({"pos": y, "right": guess == y})
           .group_by("pos").agg(pl.len().alias("n"), pl.col("right").mean().alias("knn_recall"))
           .with_columns(pl.when(pl.col("pos").is_in(FUNCTION)).then(pl.lit("function"))
                         .when(pl.col("pos").is_in(CONTENT)).then(pl.lit("content"))
                         .otherwise(pl.lit("other")).alias("word_class"))
           .sort("word_class", "knn_recall", descending=[False, True]))
with pl.Config(tbl_rows=20, float_precision=3):
    print(per_tag)
    # pooled recall favours big tags (k-NN leans to the majority, NOUN); the macro mean weighs tags equally
    print(per_tag.group_by("word_class").agg(
        pl.col("n").sum(), ((pl.col("knn_recall") * pl.col("n")).sum() / pl.col("n").sum()).alias("pooled_recall"),
        pl.col("knn_recall").mean().alias("macro_recall")).sort("word_class"))
