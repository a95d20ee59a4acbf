"""Architecture adapters and model loading: the only package that knows HF module names.

Attributes load lazily, so ``flowray.models.dtypes`` (read by the job config and the CLI) comes without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Adapter": "flowray.models.base",
    "ModelShape": "flowray.models.base",
    "FAMILIES": "flowray.models.families",
    "adapter_for": "flowray.models.families",
    "supported_model_types": "flowray.models.families",
    "ALIASES": "flowray.models.loading",
    "LoadedModel": "flowray.models.loading",
    "load_model": "flowray.models.loading",
    "DTYPES": "flowray.models.dtypes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flowray.models' has no attribute {name!r}")


def __dir__():
    return __all__
