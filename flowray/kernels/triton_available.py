"""Whether triton imports, without importing flowray's Triton programs (``triton.jit`` reads
TRITON_INTERPRET when they are imported, so that happens only once the Triton kernel is chosen)."""

from __future__ import annotations


def triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - a broken or missing triton install
        return False
    return True
