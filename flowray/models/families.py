"""Every architecture family flowray supports, and the adapter for a model or a config.

Each adapter knows its HF module names (``flowray.models.classic``, ``flowray.models.recent``); nothing
else in flowray does.
"""

from __future__ import annotations

from torch import nn

from flowray.errors import UnsupportedArchitectureError
from flowray.models.base import Adapter
from flowray.models.classic import GPT2Adapter, GPTNeoXAdapter, LlamaAdapter, OPTAdapter
from flowray.models.recent import RECENT_FAMILIES

FAMILIES: tuple[type[Adapter], ...] = (LlamaAdapter, GPT2Adapter, OPTAdapter, GPTNeoXAdapter, *RECENT_FAMILIES)


def supported_model_types() -> list[str]:
    return sorted(t for fam in FAMILIES for t in fam.model_types)


def adapter_class_for(config) -> type[Adapter]:
    """The adapter class for a HF config (checked before any weight is loaded)."""
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            fam.check_config(config)
            return fam
    families = ", ".join(f"{fam.family} ({', '.join(fam.model_types)})" for fam in FAMILIES)
    raise UnsupportedArchitectureError(
        f"model type {model_type!r} has no flowray adapter; supported families: {families}"
    )


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for a loaded HF causal LM, or UnsupportedArchitectureError naming what is supported."""
    return adapter_class_for(getattr(model, "config", None))(model)
