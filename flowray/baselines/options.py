"""The comparison's choices and defaults, importable without torch (the CLI's ``flowray compare`` reads them)."""

from __future__ import annotations

ABLATION_MODES = ("mean", "zero")  # head ablation: mean over a reference batch, or zeros
DEFAULT_KS = (1, 2, 5, 10, 20, 40)  # numbers of heads ablated for the faithfulness curve
