"""What an explorer page holds for one prompt, and its compact encoding (numpy only: no torch, no model).

Arrays travel as base64 of little-endian float32 / int32 bytes, so the page reads back the very numbers
Python has (the tests compare them bit for bit). ``attn [L, H, T, T]`` is zero above the diagonal, so only
its lower triangle is sent: for layer l, head h, row pos, source j <= pos the value sits at
``(l * H + h) * T(T+1)/2 + pos(pos+1)/2 + j``. A 30-layer, 9-head, 64-token prompt is then ~3 MB of text.

Levels (the rows of the view and the first axis of the logit lens): 0 is the embedding; sequential blocks
give block l the levels 2l+1 (``attn`` node x^{lA}) and 2l+2 (``block`` node x^l); parallel blocks give
block l the level l+1. This is ``flowray.plots._level``'s layout.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import numpy as np

from flowray.errors import InputError
from flowray.routes import check_position

SCHEMA_ID = "flowray.explorer/1"


@dataclass(frozen=True)
class PromptView:
    """One prompt's importances, logit lens and predictions, ready to embed.

    ``imp`` is a ``flowray.EdgeImportances`` (or anything with its arrays). ``K`` = top-k tokens kept,
    ``N`` = levels (``2L+1`` sequential, ``L+1`` parallel).
    """

    imp: object
    text: str
    lens_ids: np.ndarray  # [N, T, K] int: top-K next tokens of each node's residual (final norm + unembedding)
    lens_probs: np.ndarray  # [N, T, K] float32: their softmax probabilities
    top_ids: np.ndarray  # [T, K] int: the model's own top-K next tokens at each position
    top_probs: np.ndarray  # [T, K] float32
    vocab: dict[int, str]  # decoded text of every id above
    position: int = -1  # the prediction shown first
    model: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        L, H, T, T2 = self.imp.attn.shape
        if T2 != T:
            raise InputError(f"attn must have shape [L, H, T, T]; got {self.imp.attn.shape}")
        n_levels = L + 1 if self.imp.ffn_residual is None else 2 * L + 1
        K = self.top_ids.shape[-1]
        for name, arr, shape in (("lens_ids", self.lens_ids, (n_levels, T, K)), ("lens_probs", self.lens_probs, (n_levels, T, K)),
                                 ("top_ids", self.top_ids, (T, K)), ("top_probs", self.top_probs, (T, K))):
            if tuple(arr.shape) != shape:
                raise InputError(f"{name} must have shape {shape} (levels, tokens, top-k); got {tuple(arr.shape)}")
        missing = {int(i) for i in np.concatenate([self.lens_ids.ravel(), self.top_ids.ravel()])} - set(self.vocab)
        if missing:
            raise InputError(f"vocab lacks the text of token ids {sorted(missing)[:5]}; decode every lens/top id")
        check_position(self.position, T)


def b64(arr: np.ndarray, dtype: str) -> str:
    """Base64 of ``arr`` as little-endian ``dtype`` ('<f4' or '<i4'), C order."""
    return base64.b64encode(np.ascontiguousarray(arr, dtype=dtype).tobytes()).decode("ascii")


def unb64(text: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype)


def pack_lower(attn: np.ndarray) -> np.ndarray:
    """``[L, H, T, T]`` -> ``[L, H, T(T+1)/2]``: rows pos = 0..T-1, sources j = 0..pos (row-major)."""
    T = attn.shape[-1]
    rows, cols = np.tril_indices(T)  # row-major: (0,0), (1,0), (1,1), (2,0), ...
    return attn[:, :, rows, cols]


def encode_prompt(view: PromptView) -> dict:
    """The JSON-able record of one prompt (what the page's ``flowray.decode`` reads)."""
    imp = view.imp
    L, H, T, _ = imp.attn.shape
    tokens = [str(t) for t in imp.tokens] if imp.tokens is not None else [""] * T
    return {
        "text": view.text,
        "model": view.model or getattr(imp, "model_name", ""),
        "n_layers": int(L),
        "n_heads": int(H),
        "n_tokens": int(T),
        "parallel": imp.ffn_residual is None,
        "position": check_position(view.position, T),
        "tokens": tokens,
        "token_ids": [int(t) for t in getattr(imp, "token_ids", [])],
        "top_k": int(view.top_ids.shape[-1]),
        "attn": b64(pack_lower(imp.attn), "<f4"),
        "attn_residual": b64(imp.attn_residual, "<f4"),
        "ffn": b64(imp.ffn, "<f4"),
        "ffn_residual": None if imp.ffn_residual is None else b64(imp.ffn_residual, "<f4"),
        "lens_ids": b64(view.lens_ids, "<i4"),
        "lens_probs": b64(view.lens_probs, "<f4"),
        "top_ids": b64(view.top_ids, "<i4"),
        "top_probs": b64(view.top_probs, "<f4"),
        "meta": dict(view.meta),
    }


def encode_page(views: list[PromptView], *, compare: bool = False, tau: float = 0.04, title: str = "") -> dict:
    """The whole page's data: prompts, one shared vocabulary (id -> text), the mode and the first tau."""
    from flowray.routes import check_tau

    if not views:
        raise InputError("an explorer page needs at least one prompt")
    if compare and len(views) != 2:
        raise InputError(f"compare mode shows exactly two prompts side by side; got {len(views)}")
    vocab: dict[str, str] = {}
    for v in views:
        vocab.update({str(int(k)): s for k, s in v.vocab.items()})
    return {
        "schema": SCHEMA_ID,
        "title": title,
        "mode": "compare" if compare else "single",
        "tau": check_tau(tau),
        "vocab": vocab,
        "prompts": [encode_prompt(v) for v in views],
    }
