"""flowray: Information Flow Routes (Ferrando & Voita, 2024) for HF causal LMs, from one prompt to a corpus.

    import flowray
    lm = flowray.load_model("smollm2")
    ids = flowray.encode_text(lm.tokenizer, "When Mary and John went to the store, John gave a drink to")  # BOS first
    imp = flowray.edge_importances(lm, ids)          # one forward pass, every edge
    route = flowray.extract_route(imp, tau=0.04)     # typed graph, JSON / networkx
    flowray.plot_route(route, "route.png")
    stats = flowray.prediction_stats(lm, ids, taus=(0.01, 0.04))  # corpus statistics, streamed, O(T) memory

Attributes load lazily, so ``import flowray.routes`` stays free of torch-heavy imports.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "flowray.models.loading",
    "LoadedModel": "flowray.models.loading",
    "encode_text": "flowray.api",
    "edge_importances": "flowray.api",
    "EdgeImportances": "flowray.api",
    "edge_importances_batch": "flowray.api",
    "edge_importances_padded": "flowray.api",
    "prediction_stats": "flowray.stats",
    "prediction_stats_batch": "flowray.stats",
    "prediction_stats_padded": "flowray.stats",
    "PredictionStats": "flowray.stats",
    "expert_importances": "flowray.experts",
    "ExpertImportances": "flowray.experts",
    "extract_route": "flowray.routes",
    "route_masks": "flowray.routes",
    "Route": "flowray.routes",
    "RouteMasks": "flowray.routes",
    "Node": "flowray.routes",
    "Edge": "flowray.routes",
    "NodeKind": "flowray.routes",
    "EdgeKind": "flowray.routes",
    "plot_route": "flowray.plots",
    "explore": "flowray.explorer.build",
    "FlowrayError": "flowray.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flowray' has no attribute {name!r}")


def __dir__():
    return __all__
