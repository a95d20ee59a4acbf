"""How big a dense result may get before flowray refuses to allocate it (estimated first, then checked).

``edge_importances`` returns every sub-edge as a float32 ``[L, H, T, T]`` array per text: 30 layers x 9
heads at 8,192 tokens is 72 GB. Rather than die allocating it, the estimate is compared with a budget and
the error says what to do instead.
"""

from __future__ import annotations

import os

from flowray.errors import InputError

# Largest dense output (bytes, all texts of one call together). None: DENSE_RAM_FRACTION of this machine's
# RAM. Override it (flowray.limits.MAX_DENSE_OUTPUT_BYTES = ...) or with $FLOWRAY_MAX_DENSE_BYTES.
MAX_DENSE_OUTPUT_BYTES: int | None = None
DENSE_RAM_FRACTION = 0.5  # the output shares the host with the model and the forward pass's activations


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX
        return None


def dense_output_budget() -> tuple[int | None, str]:
    """The byte budget in force (None: unknown, nothing is refused) and where it comes from."""
    env = os.environ.get("FLOWRAY_MAX_DENSE_BYTES")
    if env:
        try:
            return int(float(env)), "$FLOWRAY_MAX_DENSE_BYTES"
        except ValueError:
            raise InputError(f"FLOWRAY_MAX_DENSE_BYTES must be a number of bytes; got {env!r}") from None
    if MAX_DENSE_OUTPUT_BYTES is not None:
        return int(MAX_DENSE_OUTPUT_BYTES), "flowray.limits.MAX_DENSE_OUTPUT_BYTES"
    ram = physical_memory_bytes()
    where = f"{DENSE_RAM_FRACTION:g} of this machine's RAM; $FLOWRAY_MAX_DENSE_BYTES changes it"
    return (int(ram * DENSE_RAM_FRACTION) if ram else None), where


def dense_output_bytes(n_layers: int, n_heads: int, lengths: list[int]) -> int:
    """float32 bytes of the results: ``[L, H, T, T]`` sub-edges plus the small ``[L, T]`` arrays."""
    return sum(4 * n_layers * (n_heads * T * T + 3 * T) for T in lengths)


def _gb(n: int) -> str:
    if n >= 1e8:
        return f"{n / 1e9:.1f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n:,} bytes"


def check_dense_output(n_layers: int, n_heads: int, lengths: list[int]) -> None:
    """InputError, before anything is allocated, when the dense result would exceed the budget."""
    budget, where = dense_output_budget()
    need = dense_output_bytes(n_layers, n_heads, lengths)
    if budget is None or need <= budget:
        return
    T = max(lengths)
    raise InputError(
        f"the importances would take about {_gb(need)} ({n_layers} layers x {n_heads} heads x {T} x {T} "
        f"float32{' for the longest of ' + str(len(lengths)) + ' texts' if len(lengths) > 1 else ''}), more than "
        f"the budget of {_gb(budget)} ({where}). Use a "
        f"shorter text (--max-tokens; the size grows as T^2), the streamed statistics "
        f"(flowray.prediction_stats) or the corpus job (flowray job run), which keep per-prediction summaries, "
        f"not every edge")
