"""Switching a HF model's attention implementation to a function of flowray's, and back.

transformers dispatches attention by name (``config._attn_implementation``) through its
``AttentionInterface``; masks are built by a function looked up by the same name in
``AttentionMaskInterface``. This module is the one place in flowray that touches either: the capture
(``flowray.capture.eager_attention``) and the attention knockout (``flowray.baselines``) both go through
``attention_implementation``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from flowray.errors import InputError, UnsupportedArchitectureError

MASKS = ("eager", "sdpa")  # transformers' mask builders an implementation can borrow
_REGISTER_LOCK = threading.Lock()
_registered: set[str] = set()


def register_attention(name: str, attention: Callable, mask: str) -> None:
    """Register ``attention`` with transformers' AttentionInterface under ``name``, once per process.

    ``mask`` names the mask function transformers builds masks with for it: ``"eager"`` (an additive float
    mask, always) or ``"sdpa"`` (None when plain causal, else boolean). Without a registered mask function
    transformers builds *no* mask for an unknown name, so no causality.
    """
    if mask not in MASKS:
        raise InputError(f"mask must be one of {MASKS}; got {mask!r}")
    with _REGISTER_LOCK:
        if name in _registered:
            return
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, {"eager": eager_mask, "sdpa": sdpa_mask}[mask])
        _registered.add(name)


@contextlib.contextmanager
def attention_implementation(
    model,
    name: str,
    attention: Callable,
    *,
    mask: str,
    fallback: str | None = None,
    accept: tuple[str, ...] = (),
    purpose: str = "flowray",
) -> Iterator[str]:
    """Within the block, ``model`` runs ``attention`` (registered as ``name``); the previous one comes back on exit.

    Args:
        name, attention, mask: see ``register_attention``.
        fallback: a built-in implementation (``"eager"``) to switch to when transformers cannot switch this
            model to ``name``; None: that is an UnsupportedArchitectureError naming ``purpose``.
        accept: implementations that already serve; when the model runs one of them nothing is switched.

    Yields the implementation in force inside the block.
    """
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    if previous == name or previous in accept:
        yield previous
        return
    register_attention(name, attention, mask)
    try:
        try:
            model.set_attn_implementation(name)
        except (ValueError, TypeError, KeyError):
            if fallback is None:
                raise
        if getattr(config, "_attn_implementation", None) != name:
            if fallback is None:
                raise UnsupportedArchitectureError(
                    f"{type(model).__name__} does not let transformers switch its attention implementation, so "
                    f"{purpose} cannot intervene on it"
                )
            model.set_attn_implementation(fallback)
        yield config._attn_implementation
    finally:
        if previous is not None and getattr(config, "_attn_implementation", None) != previous:
            model.set_attn_implementation(previous)
