"""Architecture adapters and model loading: the only package that knows HF module names."""

from flowray.models.base import Adapter, ModelShape
from flowray.models.families import FAMILIES, adapter_for, supported_model_types
from flowray.models.loading import ALIASES, LoadedModel, load_model

__all__ = [
    "ALIASES",
    "Adapter",
    "FAMILIES",
    "LoadedModel",
    "ModelShape",
    "adapter_for",
    "load_model",
    "supported_model_types",
]
