"""How big an explorer page gets, estimated before anything is computed, and the limit it must stay under.

The page embeds every sub-edge importance, the lower triangle of ``attn [L, H, T, T]`` as base64 float32,
so it grows as ``L * H * T^2``: a 969-token SmolLM2 text (30 x 9 heads) is a ~680 MB page, which Chromium cannot
parses (the data is one JavaScript string; V8 caps a string at ~537M characters). Pages are refused above
``MAX_PAGE_MB`` before the model runs, with the ``--max-tokens`` that would fit.
"""

from __future__ import annotations

from flowray.errors import InputError

MAX_PAGE_MB = 128  # headless Chromium: 130 MB opened in ~3 s, 357 MB in ~10 s (30 x 9 heads, 420 / 700 tokens)
_FIXED_BYTES = 40_000  # template, styles, script (33 kB today), title


def _b64(nbytes: int) -> int:
    return 4 * -(-nbytes // 3)


def page_bytes(n_layers: int, n_heads: int, parallel: bool, lengths: list[int], top_k: int) -> int:
    """Estimated size of a page of prompts of ``lengths`` tokens (what ``data.encode_page`` writes)."""
    total = _FIXED_BYTES
    levels = n_layers + 1 if parallel else 2 * n_layers + 1
    for T in lengths:
        total += _b64(4 * n_layers * n_heads * T * (T + 1) // 2)  # attn's lower triangle
        total += 3 * _b64(4 * n_layers * T)  # attn_residual, ffn, ffn_residual
        total += 2 * _b64(4 * levels * T * top_k) + 2 * _b64(4 * T * top_k)  # logit lens, predictions
        total += 40 * T  # tokens, their ids and the vocabulary's strings
    return total


def check_page_size(n_layers: int, n_heads: int, parallel: bool, lengths: list[int], top_k: int,
                    max_mb: float = MAX_PAGE_MB, *, lead: int = 0) -> None:
    """InputError when the page would exceed ``max_mb``; the message gives the --max-tokens that fits.

    ``lengths`` count the BOS when there is one (``lead`` = 1), which --max-tokens does not.
    """
    need = page_bytes(n_layers, n_heads, parallel, lengths, top_k)
    limit = int(max_mb * 1e6)
    if need <= limit:
        return
    lo, hi = 1, max(lengths) - lead  # the largest text cap whose page fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        fits = page_bytes(n_layers, n_heads, parallel, [min(T, mid + lead) for T in lengths], top_k) <= limit
        lo, hi = (mid, hi) if fits else (lo, mid - 1)
    raise InputError(
        f"the explorer page would be about {need / 1e6:,.0f} MB ({n_layers} layers x {n_heads} heads, "
        f"{'texts of up to ' if len(lengths) > 1 else ''}{max(lengths)} tokens: it grows as tokens^2), more than "
        f"the {max_mb:g} MB limit a browser opens reliably; pass --max-tokens {lo} (or less) to explore the "
        "first tokens, or use `flowray route` for long texts (--max-page-mb raises the limit)")
