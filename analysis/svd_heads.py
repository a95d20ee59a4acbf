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
# # What domain-specific heads write: SVD of W_OV onto the vocabulary (paper figure 11)
#
# Ferrando & Voita (2024), section 5.2. A head moves `x_j L W_OV^h` from each attended position into the
# residual stream, with `W_OV^h = W_V^h W_O^h` (`d x d`, rank `d_head`). Its thin SVD
# `W_OV^h = U S V^T` writes the head as `sum_i (x u_i s_i) v_i^T`: the query-dependent weight
# `x u_i s_i` scales a fixed output direction `v_i`. Projecting the top right-singular vectors onto the
# vocabulary — through the final norm's gain and the unembedding, as the model does before predicting —
# shows which tokens each direction promotes. The paper finds code-specific heads promoting coding and
# technology tokens and non-English-specific heads promoting tokens in several languages.
#
# Here: the most domain-specific heads of each domain in `DOMAINS` (largest importance difference to the
# general domain, from the job's `tables/domain_specialisation`), plus the general domain's most important
# head as a reference. The attention norm's gain is folded into `W_V` (appendix B.3; for a LayerNorm the
# centring too); biases are left out (they do not depend on the input). With grouped-query attention query
# head `h` reads kv head `h // (H / H_kv)`.
#
# How to read the table figure: one row per (head, singular direction i), with `s_i` and the top
# `N_TOKENS` tokens of `+v_i` (and, in the second column, of `−v_i`: a singular vector's sign is
# arbitrary and the head writes whichever sign `x u_i` takes). `·` stands for a leading space.
#
# The model is loaded from the run's manifest (`model.spec`, `config.dtype`); for a 7B model that needs
# the weights and ~28 GB of memory in float32 (the notebook only reads W_V, W_O, the norms and W_U).

# %% tags=["parameters"]
import os

RUN = os.environ.get("FLOWRAY_RUN", "runs/shared_data")  # a run directory or a bucket URI
FIGURES = os.environ.get("FLOWRAY_FIGURES", "out/figures")
DOMAINS = None  # None: every non-English text domain and code (the paper's figure 11); or a list of names
HEADS_PER_DOMAIN = 2
N_DIRECTIONS = 2  # top singular directions per head
N_TOKENS = 6
MODEL = None  # None: the run's model spec; or another spec/path of the same model
DEVICE = "cpu"

# %%
import sys
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, imported by transformers
sys.path.insert(0, "analysis" if os.path.isfile("analysis/common.py") else ".")
import common
import matplotlib.pyplot as plt
import polars as pl
import torch

import flowray
from flowray.errors import InputError

run = common.open_run(RUN)
L, H = run.n_layers, run.n_heads
general = run.general
if DOMAINS is None:
    domains = [d for d in run.domains
               if not run.is_task(d) and d != general and run.language(d) != "en"]
else:
    domains = list(DOMAINS)
print(run.describe())
print("domains:", domains)

spec = run.table("domain_specialisation").filter(pl.col("domain").is_in(domains)).collect()
chosen = (spec.sort(["specialised", "difference"], descending=True)
          .group_by("domain", maintain_order=True).head(HEADS_PER_DOMAIN)
          # a head chosen by several domains is listed once, with all of them
          .group_by("layer", "head", maintain_order=True)
          .agg(pl.col("domain").str.join(", "), pl.col("importance").max(), pl.col("general_importance").first(),
               pl.col("ratio").max(), pl.col("specialised").any())
          .select("domain", "layer", "head", "importance", "general_importance", "ratio", "specialised"))
reference = (run.table("component_importance")
             .filter((pl.col("domain") == general) & (pl.col("component") == "head"))
             .sort("importance", descending=True).head(1)
             .select(pl.lit(f"{general} (top head)").alias("domain"), "layer", pl.col("head").cast(pl.Int64),
                     "importance", pl.col("importance").alias("general_importance"),
                     pl.lit(1.0).alias("ratio"), pl.lit(False).alias("specialised")).collect())
chosen = pl.concat([chosen.with_columns(pl.col("head").cast(pl.Int64)), reference], how="vertical_relaxed")
with pl.Config(tbl_cols=-1, tbl_width_chars=200, float_precision=4):
    print(chosen)

# %%
lm = flowray.load_model(MODEL or run.model_spec, dtype=run.config.get("dtype", "float32"), device=DEVICE)
ad = lm.adapter
shape = ad.shape
if (shape.n_layers, shape.n_heads) != (L, H):
    raise InputError(f"the model has {shape.n_layers} layers x {shape.n_heads} heads but the run has {L} x {H}; "
                     f"MODEL={MODEL!r} is not the run's model; set MODEL = None to load the run's own model")
blocks = ad.layers()


def norm_map(norm: torch.nn.Module, d: int) -> torch.Tensor:
    """``[d, d]`` linear part of the norm with sigma held fixed (appendix B.1): diag(gamma), with the
    mean-centring first for a LayerNorm (RMSNorm does not centre)."""
    gamma = norm.weight.detach().float().cpu()
    if isinstance(norm, torch.nn.LayerNorm):
        centre = torch.eye(d) - torch.full((d, d), 1.0 / d)
        return centre @ torch.diag(gamma)
    return torch.diag(gamma)


@torch.no_grad()
def ov_svd(layer: int, head: int):
    """Thin SVD of the folded ``W_OV = N W_V W_O`` (``d x d``, rank ``d_head``) without forming it:
    QR of both factors, SVD of the small ``d_head x d_head`` core. Returns U ``[d, r]``, S ``[r]``, V ``[d, r]``."""
    block = blocks[layer]
    w_v, _ = ad.value_weight(block)  # [H_kv, d, dh]
    w_o, _ = ad.output_projection(block)  # [H, dh, d]
    a = norm_map(ad.attention_norm(block), shape.d_model) @ w_v[head // shape.kv_group].detach().float().cpu()  # [d, dh]
    b = w_o[head].detach().float().cpu()  # [dh, d]
    qa, ra = torch.linalg.qr(a)  # [d, dh], [dh, dh]
    qb, rb = torch.linalg.qr(b.T)  # [d, dh], [dh, dh]
    u_core, s, vh_core = torch.linalg.svd(ra @ rb.T)  # a @ b = qa (ra rb^T) qb^T
    return qa @ u_core, s, qb @ vh_core.T


# the factorisation reproduces W_OV: a cheap check on the first chosen head
_l, _h = int(chosen["layer"][0]), int(chosen["head"][0])
_u, _s, _v = ov_svd(_l, _h)
_w = (norm_map(ad.attention_norm(blocks[_l]), shape.d_model)
      @ ad.value_weight(blocks[_l])[0][_h // shape.kv_group].detach().float().cpu()
      @ ad.output_projection(blocks[_l])[0][_h].detach().float().cpu())
assert torch.allclose(_u @ torch.diag(_s) @ _v.T, _w, atol=1e-4 * float(_w.abs().max())), "thin SVD does not rebuild W_OV"
print(f"L{_l}H{_h}: W_OV {tuple(_w.shape)}, rank {int((_s > _s[0] * 1e-6).sum())}, top singular values "
      f"{[round(float(x), 3) for x in _s[:4]]}")

# %%
final = norm_map(ad.final_norm(), shape.d_model)  # [d, d]
w_u = ad.unembedding().detach().float().cpu()  # [V, d]


def show(token_id: int) -> str:
    text = lm.tokenizer.decode([token_id])
    return text.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t") or f"<{token_id}>"


rows = []
with torch.no_grad():
    for r in chosen.iter_rows(named=True):
        u, s, v = ov_svd(r["layer"], r["head"])
        logits = w_u @ (final @ v[:, :N_DIRECTIONS])  # [V, N_DIRECTIONS]: each v_i through the final norm's gain
        for i in range(N_DIRECTIONS):
            top_pos = torch.topk(logits[:, i], N_TOKENS).indices.tolist()
            top_neg = torch.topk(-logits[:, i], N_TOKENS).indices.tolist()
            rows.append({"domain": r["domain"], "head": common.head_name(r["layer"], r["head"]),
                         "ratio_vs_general": r["ratio"], "i": i, "sigma": float(s[i]),
                         "+v tokens": " ".join(show(t) for t in top_pos),
                         "−v tokens": " ".join(show(t) for t in top_neg)})
svd_table = pl.DataFrame(rows)
with pl.Config(tbl_rows=100, fmt_str_lengths=80, tbl_width_chars=200, float_precision=2):
    print(svd_table)

# %%
cells = [[r["domain"], f"{r['head']} (x{r['ratio_vs_general']:.1f})", str(r["i"]), f"{r['sigma']:.2f}",
          r["+v tokens"], r["−v tokens"]] for r in rows]
fig, ax = plt.subplots(figsize=(15, max(2.5, 0.26 * len(cells) + 0.5)))  # a readable height for a few rows
ax.axis("off")
table = ax.table(cellText=cells, colLabels=["domain", "head (x general)", "i", "σ_i", f"top {N_TOKENS} tokens of +v_i",
                                            f"top {N_TOKENS} tokens of −v_i"],
                 colWidths=[0.16, 0.1, 0.03, 0.05, 0.33, 0.33], loc="center", cellLoc="left")
table.auto_set_font_size(False)
table.set_fontsize(7.5)
table.scale(1, 1.25)
ax.set_title(f"W_OV singular directions projected onto the vocabulary — {run.model_spec}", fontsize=10)
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Glyph .* missing")  # scripts the default font lacks
    fig.tight_layout()
    common.save_figure(fig, FIGURES, "fig11_svd_heads", dpi=100)
