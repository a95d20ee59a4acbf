"""The compiled loops of the CPU backend (``flowray.kernels.cpu``): sub-edge proximities and node normalisation.

``flowray.importance`` explains the maths. What is left after its matrix products is irregular (each
sub-edge needs no correction, a few coordinates, or all of them) and touches every sub-edge once: a loop
compiled with numba does that in place, in one pass, where chains of vectorised torch ops (gathers,
masks, ragged sums) each cost a pass over memory. Arrays in, arrays out; it sees no model and no torch.

numba compiles these functions on their first call in a process (about 2 s) and caches the machine code
beside this file (or in numba's user cache when this folder is read-only), so later processes load it
in about 0.3 s. Threads: as many as torch uses (``torch.get_num_threads()``).
"""

from __future__ import annotations

import importlib.util
import os
import threading

import numpy as np

from flowray.errors import MissingDependencyError

# numba is imported on the first kernel call, not here: its thread pool is sized when it is imported
AVAILABLE = importlib.util.find_spec("numba") is not None
numba = None  # the module, once imported (the compiled functions below refer to numba.prange)


def _f_max(F):  # pragma: no cover - compiled
    """``max_d |F[h, j, d]|`` ``[H, T]`` for F ``[H, T, d]`` float32, once per layer (every row chunk reads it).

    On the bits: clearing the sign bit is abs(), and non-negative floats (NaN above inf) order like their
    bits as integers, whose max LLVM vectorises (a float max it may not reorder).
    """
    H, T, d = F.shape
    F_bits = F.view(np.int32)
    f_max_bits = np.empty((H, T), dtype=np.int32)
    for task in numba.prange(H * T):
        h = task // T
        j = task - h * T
        m = np.int32(0)
        for k in range(d):
            m = max(m, F_bits[h, j, k] & np.int32(0x7FFFFFFF))
        f_max_bits[h, j] = m
    return f_max_bits.view(np.float32)


def _prox_rows(out, probs, F, f_max, y, p0, few):  # pragma: no cover - compiled
    """Turn ``out[g, h, r, j] = s_p . F_ghj`` (j <= p) into ``prox(alpha[g, h, r, j] F_ghj, y_gr)``; zero j > p.

    ``G`` sequences, each a chunk of ``C`` query rows at positions ``p = p0 + r``: out, probs ``[G, H, C, J]``
    float32 with ``J >= p0 + C`` sources; F ``[H, G, T, d]`` and f_max ``[H, G, T]``, head-major (``T >= J``;
    only ``j < J`` is read); y ``[G, C, d]`` the chunks' nodes; few: how many of the smallest ``|y_p|`` coordinates
    to keep per row. A whole sequence is one chunk with ``p0 = 0``, ``C = J = T``; several whole sequences of
    a right-padded batch are one call on the padded grid (a real row never reads a source after it).

    Only coordinates with ``|y_d| < a |F_d| <= a max|F_hj|`` can overshoot, so each sub-edge takes the
    cheapest exact case:
    - ``a s.F <= 0``: proximity 0;
    - ``a max|F_hj| <= min|y_p|``: nothing overshoots, the proximity is ``a s.F`` itself;
    - ``a max|F_hj| <=`` the ``few+1``-th smallest ``|y_p|``: only ``y_p``'s ``few`` smallest coordinates
      can overshoot; subtract ``2 relu(a s_d F_d - |y_d|)`` over those (the usual case: 86% of the others
      at 256 tokens on SmolLM2, 92% at 1024, with ``few = 16``);
    - otherwise ``sum_d (|y_d| - |y_d - a F_d|)`` over all ``d`` in one branch-free loop that LLVM
      vectorises (each term is small where ``a F_d`` is, so float32 keeps it accurate).
    """
    G, H, C, J = out.shape
    d = F.shape[3]
    zero = np.float32(0.0)
    n_few = min(few, d)
    # per row: the n_few smallest |y_p| ascending (their coordinates and signs), then a bound that
    # every other coordinate reaches: the next smallest |y_p| (inf when there is none)
    small = np.full((G, C, n_few + 1), np.inf, dtype=np.float32)
    small_at = np.zeros((G, C, n_few + 1), dtype=np.int64)
    small_sign = np.ones((G, C, n_few), dtype=np.float32)
    for task in numba.prange(G * C):
        g = task // C
        r = task - g * C
        vals, at = small[g, r], small_at[g, r]
        for k in range(d):  # insertion into the sorted n_few + 1 smallest
            u = abs(y[g, r, k])
            if u < vals[n_few]:
                q = n_few
                while q > 0 and vals[q - 1] > u:
                    vals[q] = vals[q - 1]
                    at[q] = at[q - 1]
                    q -= 1
                vals[q] = u
                at[q] = k
        for q in range(n_few):
            if y[g, r, at[q]] < 0:
                small_sign[g, r, q] = -1.0
    for task in numba.prange(G * H * C):
        g = task // (H * C)
        h = (task // C) % H
        r = task % C
        p = p0 + r
        yp = y[g, r]
        smallest = small[g, r, 0]
        bound = small[g, r, n_few]
        row, arow, fm = out[g, h, r], probs[g, h, r], f_max[h, g]
        for j in range(p + 1):
            a = arow[j]
            lin = a * row[j]  # a (s . F): exact when no coordinate of a F overshoots y
            if not lin > zero:  # prox = relu(lin - 2 * overshoot) with overshoot >= 0
                row[j] = zero
                continue
            thr = a * fm[j]
            if thr <= smallest:  # a |F_d| <= thr <= |y_d| everywhere: nothing overshoots
                row[j] = lin
                continue
            Fj = F[h, g, j]
            if thr <= bound:  # only the n_few smallest coordinates can overshoot
                over = zero
                for q in range(n_few):  # zero wherever a coordinate does not overshoot
                    over += max(a * small_sign[g, r, q] * Fj[small_at[g, r, q]] - small[g, r, q], zero)
                v = lin - np.float32(2.0) * over
            else:
                v = zero
                for k in range(d):  # from 0 to a fixed count over contiguous rows: LLVM vectorises this
                    v += abs(yp[k]) - abs(yp[k] - a * Fj[k])
            row[j] = v if v > zero else zero
        for j in range(p + 1, J):
            row[j] = zero


def _normalise_rows(sub, y, parts, p0):  # pragma: no cover - compiled
    """Finish chunks of nodes: direct parts' proximities, then every part divided by the node's total.

    sub: ``[G, H, C, J]`` sub-edge proximities of rows at positions ``p0 + r`` of ``G`` sequences (``H`` may
    be 0), scaled in place; y: ``[G, C, d]`` the nodes; parts: ``[K, G, C, d]`` the direct parts. Returns
    their importances ``[K, G, C]``. A node whose parts all have proximity 0 gets 0 everywhere (not NaN).
    """
    H = sub.shape[1]
    K, G, C, d = parts.shape
    zero = np.float32(0.0)
    direct = np.empty((K, G, C), dtype=np.float32)
    for task in numba.prange(G * C):
        g = task // C
        p = task - g * C
        yp = y[g, p]
        total = 0.0  # float64
        for k in range(K):
            zp = parts[k, g, p]
            v = zero
            for c in range(d):  # sum_d |y_d| - |y_d - z_d|: small terms where z is small
                v += abs(yp[c]) - abs(yp[c] - zp[c])
            v = v if v > zero else zero
            direct[k, g, p] = v
            total += v
        for h in range(H):
            row = sub[g, h, p]
            acc = zero
            for j in range(p0 + p + 1):
                acc += row[j]
            total += acc
        scale = np.float32(1.0 / total) if total > 0.0 else zero
        for k in range(K):
            direct[k, g, p] *= scale
        for h in range(H):
            row = sub[g, h, p]
            for j in range(p0 + p + 1):
                row[j] *= scale
    return direct


_compiled: dict = {}
_lock = threading.Lock()
_threads = threading.local()  # the thread count this thread last gave numba


def _kernels(threads: int) -> dict:
    """The compiled functions, after sizing numba's thread pool to ``threads`` on first use.

    numba's OpenMP pool starts ``NUMBA_NUM_THREADS`` threads (default: every core) when numba is imported,
    and idle ones spin: two single-threaded Ray actors on two cores then run 4x slower than one (measured).
    So unless the user set it, the pool gets the threads torch uses in this process when the kernel first
    runs (a Ray actor has set torch's threads to its CPUs by then).
    """
    global numba
    with _lock:
        if not _compiled:
            if not AVAILABLE:  # pragma: no cover - guarded by the caller
                raise MissingDependencyError("the CPU kernel needs numba: pip install numba")
            os.environ.setdefault("NUMBA_NUM_THREADS", str(max(1, threads)))
            import numba as _numba

            numba = _numba
            # reassoc lets LLVM vectorise the sums; no "nnan"/"ninf": a NaN from an overflowing model stays NaN
            jit = numba.njit(
                parallel=True, cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "nsz", "contract"}
            )
            _compiled["f_max"] = jit(_f_max)
            _compiled["prox"] = jit(_prox_rows)
            _compiled["normalise"] = jit(_normalise_rows)
    n = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    if getattr(_threads, "n", None) != n:  # numba's setting is per calling thread; setting it costs ~15 us
        numba.set_num_threads(n)
        _threads.n = n
    return _compiled


def warm_up(threads: int = 1) -> None:
    """Compile (first time, ~7 s) or load from numba's cache (~0.4 s) every kernel, on tiny arrays.

    The corpus job calls it in the driver before actors start, so that replicas on the same machine load
    the cached machine code instead of each compiling it, and in each actor's start-up, so that its first
    shard is not slowed by it.
    """
    if not AVAILABLE:
        return
    F = np.ones((1, 1, 2, 3), dtype=np.float32)
    fm = f_max(F[0], threads)[None]  # G = H = 1: head-major or not alike
    out, probs = np.ones((1, 1, 2, 2), np.float32), np.ones((1, 1, 2, 2), np.float32)
    y = np.ones((1, 2, 3), np.float32)
    prox_rows(out, probs, F, fm, y, 0, threads)
    normalise_rows(out, y, y[None].copy(), 0, threads)


def f_max(F: np.ndarray, threads: int) -> np.ndarray:
    """``max_d |F|`` ``[H, T]`` of head outputs ``[H, T, d]`` on ``threads`` threads."""
    return _kernels(threads)["f_max"](F)


def prox_rows(out: np.ndarray, probs: np.ndarray, F: np.ndarray, f_max: np.ndarray, y: np.ndarray, p0: int,
              threads: int, few: int = 16) -> None:
    """Sub-edge proximities of chunks of query rows of ``G`` sequences, in place (``_prox_rows``: the arrays;
    ``few``: the smallest ``|y_p|`` coordinates kept per row, ``KernelConfig.few``)."""
    _kernels(threads)["prox"](out, probs, F, f_max, y, p0, few)


def normalise_rows(sub: np.ndarray, y: np.ndarray, parts: np.ndarray, p0: int, threads: int) -> np.ndarray:
    """Direct parts' importances ``[K, G, C]``; proximities ``[G, H, C, J]`` made importances in place."""
    return _kernels(threads)["normalise"](sub, y, parts, p0)
