"""The weight dtypes a model can be loaded in, by name.

Names only, so the job config and the CLI can check a dtype without importing torch;
``flowray.models.loading.resolve_dtype`` turns a name into the torch dtype.
"""

from __future__ import annotations

DTYPES = ("float32", "float16", "bfloat16")
