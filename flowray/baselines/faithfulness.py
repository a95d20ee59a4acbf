"""Faithfulness: how much of the logit difference is left when a ranking's top-k heads are ablated together.

Each ranking's top-k heads, and k random heads (several draws), are mean-ablated (each head's output
replaced, at every position, by its mean over ABC twins of the same template and token length) or
zero-ablated. ``LD retained = mean_p(LD_ablated) / mean_p(LD_clean)``; lower means the heads matter more.
Shapes: ``C`` head sets, ``P`` prompts, ``L`` layers, ``H`` heads, ``T`` tokens, ``dh`` head dim.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from flowray.baselines.agreement import mean_sd
from flowray.baselines.interventions import ablation_sweep, head_means
from flowray.baselines.measure import groups, prepare
from flowray.errors import InputError

log = logging.getLogger(__name__)


def head_sets(rankings: dict, ks, draws: int, seed: int, n_layers: int, n_heads: int) -> tuple[np.ndarray, list]:
    """``(masks [C, L, H] bool, labels)``: each ranking's top-k heads for every k, then ``draws`` random sets
    of k heads; ``labels[c] = (curve name, k, draw)``."""
    rng = np.random.default_rng(seed)
    configs, labels = [], []
    for name, ranking in rankings.items():
        for k in ks:
            mask = np.zeros((n_layers, n_heads), dtype=bool)
            for l, h in ranking[:k]:
                mask[l, h] = True
            configs.append(mask)
            labels.append((name, k, 0))
    for k in ks:
        for d in range(draws):
            mask = np.zeros(n_layers * n_heads, dtype=bool)
            mask[rng.choice(mask.size, size=k, replace=False)] = True
            configs.append(mask.reshape(n_layers, n_heads))
            labels.append(("random", k, d))
    return np.stack(configs), labels


def reference_means(lm, items, *, reference_n: int, seed: int, templates: str, progress: bool) -> tuple[dict, list]:
    """Mean-ablation references: ``((template, T) -> [L, T, H, dh] mean head outputs, group sizes)`` over the
    prompts' ABC twins plus the twins of ``reference_n`` extra IOI prompts."""
    tok = lm.tokenizer
    refs = [it.corrupt for it in items]
    ref_keys = [(it.prompt.template, int(it.corrupt.shape[0])) for it in items]
    if reference_n > 0:
        try:
            from flowray.tasks import ioi_prompts

            extra, _ = prepare(ioi_prompts(reference_n, seed=seed + 1_000_003, tokenizer=tok, templates=templates), tok)
        except InputError as exc:  # e.g. a tokenizer with few one-token names
            log.warning("no extra mean-ablation reference prompts: %s", exc)
            extra = []
        refs += [it.corrupt for it in extra]
        ref_keys += [(it.prompt.template, int(it.corrupt.shape[0])) for it in extra]
    means_by_key, sizes = {}, []
    for key, idx in tqdm(groups(ref_keys).items(), desc="ablation means", disable=not progress, leave=False):
        means_by_key[key] = head_means(lm.model, lm.adapter, torch.stack([refs[i] for i in idx]))  # [L, T, H, dh]
        sizes.append(len(idx))
    return means_by_key, sizes


def faithfulness(lm, items, by_length: dict, answer, wrong, ld_clean, rankings: dict, *, ks, draws: int, seed: int,
                 ablation: str, reference_n: int, templates: str, batch_size: int, progress: bool) -> dict:
    """LD retained when the top-k heads of each ranking, or k random heads, are ablated."""
    s = lm.adapter.shape
    masks, labels = head_sets(rankings, ks, draws, seed, s.n_layers, s.n_heads)  # [C, L, H]
    means_by_key, reference_sizes = {}, []
    if ablation == "mean":
        means_by_key, reference_sizes = reference_means(lm, items, reference_n=reference_n, seed=seed,
                                                        templates=templates, progress=progress)
    ld = np.zeros((masks.shape[0], len(items)))
    bar = tqdm(total=masks.shape[0] * len(items), desc="ablation", unit="fwd", disable=not progress)
    for T, idx in by_length.items():
        ids = torch.stack([items[i].clean for i in idx])
        means = None
        if ablation == "mean":
            means = torch.stack([means_by_key[(items[i].prompt.template, T)] for i in idx], dim=1)  # [L, P, T, H, dh]
        ld[:, idx] = ablation_sweep(lm.model, lm.adapter, ids, masks, answer[idx], wrong[idx], mode=ablation,
                                    means=means, batch_size=batch_size)
        bar.update(masks.shape[0] * len(idx))
    bar.close()
    return _curves(ld, labels, ld_clean, ks=ks, ablation=ablation, draws=draws, reference_sizes=reference_sizes)


def _curves(ld: np.ndarray, labels: list, ld_clean, *, ks, ablation: str, draws: int, reference_sizes: list) -> dict:
    """``ld [C, P]`` -> per curve and k, the mean (and sd over draws) of LD retained."""
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
        out["curves"][name] = {str(k): dict(zip(("mean", "sd"), mean_sd(v))) for k, v in per_k.items()}
    return out
