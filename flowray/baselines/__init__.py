"""Patching baselines and their comparison with information flow routes.

- ``interventions``: per-head activation patching and head ablation (hooks on W_O's input);
- ``knockout``: attention knockout of (query, source) pairs;
- ``eap``: attribution patching (EAP), the gradient estimate of per-head patching;
- ``batched``: the routes the corpus job's way (batched statistics, last position) and their time split;
- ``forward``: what they share (input checks, last-position logits, the logit difference);
- ``measure``: the measurement run's phases (routes, patching, knockout, EAP timed side by side);
- ``agreement``: rank statistics, head rankings, token-pair agreement;
- ``faithfulness``: ablating each ranking's top heads against random heads;
- ``run``: ``run_comparison``, the whole comparison, written to a directory;
- ``report``: ``report.md`` from the summary;
- ``options``: choices and defaults the CLI reads without torch.

Names below load lazily, so that ``flowray.baselines.options`` (and the CLI) do not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "interventions": ("PatchingResult", "ablate_heads", "ablation_sweep", "head_means", "head_outputs",
                      "patching_sweep", "replace_heads"),
    "knockout": ("KNOCKOUT_IMPLEMENTATION", "Knockout", "KnockoutResult", "attention_knockout", "knockout_pairs",
                 "knockout_sweep", "_PLANS", "_knockout_attention"),
    "eap": ("eap_sweep",),
    "batched": ("LastRoute", "last_routes"),
    "forward": ("last_logits", "logit_diff"),
    "measure": ("Stopwatch",),
    "agreement": ("rank_heads", "rankdata", "spearman", "top_k"),
    "run": ("run_comparison",),
    "report": ("print_summary", "render_report", "write_report"),
    "options": ("ABLATION_MODES", "DEFAULT_KS"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_WHERE["register_attention"] = "flowray.models.attention"

__all__ = sorted(n for n in _WHERE if not n.startswith("_"))


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'flowray.baselines' has no attribute {name!r}")
    return getattr(importlib.import_module(module if "." in module else f"flowray.baselines.{module}"), name)


def __dir__():
    return __all__
