"""The CPU kernel of ``flowray.importance``: every sub-edge's proximity from the GEMM term, in place.

``flowray.importance`` explains the maths; this is its inner loop compiled with numba, because the work
left after the matrix products is irregular (a different, short run of coordinates per sub-edge) and a
loop over it costs a few nanoseconds per coordinate where a chain of vectorised torch gathers costs ten
times that. Arrays in, arrays out; it sees no model and no torch.

numba compiles the loop on its first call in a process (about 2 s) and caches the machine code beside this
file (or in numba's user cache when this folder is read-only), so later processes load it in milliseconds.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - numba is a declared dependency; the torch path still works
    numba = None

AVAILABLE = numba is not None


def _prox_inplace(out, probs, F, y):  # pragma: no cover - compiled
    """Turn ``out[h, p, j] = s_p . F_hj`` (j <= p) into ``prox(alpha[h, p, j] F_hj, y_p)``; zero j > p.

    out, probs: ``[H, T, T]`` float32; F: ``[H, T, d]``; y: ``[T, d]``.

    Most sub-edges need no correction: ``a s.F <= 0`` gives 0, and ``a max|F_hj| <= min|y_p|`` means no
    coordinate overshoots, so the proximity is ``a s.F`` itself. The others (about a fifth on SmolLM2)
    get ``sum_d (|y_d| - |y_d - a F_d|)`` in one branch-free loop that LLVM vectorises; each term is
    small where ``a F_d`` is, so float32 keeps it accurate. Measured on SmolLM2 at 256 tokens, this
    loop (two streams: y and F) beats summing the overshoot ``relu(a s_d F_d - |y_d|)`` only over blocks
    of coordinates that can overshoot (three streams and a bound test per block), and walking the
    coordinates in ascending ``|y_p|`` order (a sort and a scattered gather per sub-edge).
    """
    H, T, d = F.shape
    zero = np.float32(0.0)
    f_max = np.empty((H, T), dtype=np.float32)  # max_d |F_hj,d|
    for task in numba.prange(H * T):
        h = task // T
        j = task - h * T
        m = zero
        for k in range(d):
            m = max(m, abs(F[h, j, k]))
        f_max[h, j] = m
    y_min = np.empty(T, dtype=np.float32)  # min_d |y_p,d|
    for p in numba.prange(T):
        m = np.float32(np.inf)
        for k in range(d):
            m = min(m, abs(y[p, k]))
        y_min[p] = m
    for task in numba.prange(H * T):
        h = task // T
        p = task - h * T
        yp = y[p]
        smallest = y_min[p]
        for j in range(p + 1):
            a = probs[h, p, j]
            lin = a * out[h, p, j]  # a (s . F): exact when no coordinate of a F overshoots y
            if not lin > zero:  # prox = relu(lin - 2 * overshoot) with overshoot >= 0
                out[h, p, j] = zero
                continue
            if a * f_max[h, j] <= smallest:  # a |F_d| <= a max|F| <= |y_d| everywhere: nothing overshoots
                out[h, p, j] = lin
                continue
            Fj = F[h, j]
            acc = zero
            for k in range(d):  # from 0 to a fixed count over contiguous rows: LLVM vectorises this
                acc += abs(yp[k]) - abs(yp[k] - a * Fj[k])
            out[h, p, j] = acc if acc > zero else zero
        for j in range(p + 1, T):
            out[h, p, j] = zero


if AVAILABLE:
    # reassoc lets LLVM vectorise the sum; no "nnan"/"ninf": a NaN from an overflowing model stays a NaN
    _prox_inplace = numba.njit(
        parallel=True, cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "nsz", "contract"}
    )(_prox_inplace)


def prox_inplace(
    out: np.ndarray,
    probs: np.ndarray,
    F: np.ndarray,
    y: np.ndarray,
    threads: int,
) -> None:
    """Run the compiled kernel on ``threads`` threads (see ``_prox_inplace`` for the arrays)."""
    if not AVAILABLE:  # pragma: no cover - guarded by the caller
        raise ImportError("the CPU kernel needs numba: pip install numba")
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    _prox_inplace(out, probs, F, y)
