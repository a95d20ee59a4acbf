"""The interactive route explorer: one self-contained, offline HTML page per prompt (or prompts).

``explore`` (model + texts -> page) needs torch; ``explorer_html`` / ``write_explorer`` take prepared
``PromptView`` records and need numpy only. ``write_report`` writes a job run's ``report.html``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "explore": "flowray.explorer.build",
    "prompt_view": "flowray.explorer.build",
    "PromptView": "flowray.explorer.data",
    "explorer_html": "flowray.explorer.page",
    "write_explorer": "flowray.explorer.page",
    "logit_lens": "flowray.explorer.lens",
    "write_report": "flowray.explorer.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flowray.explorer' has no attribute {name!r}")
