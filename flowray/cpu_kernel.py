"""The CPU kernel of ``flowray.importance``: sub-edge proximities and node normalisation, compiled with numba.

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

# numba is imported on the first kernel call, not here: its thread pool is sized when it is imported
AVAILABLE = importlib.util.find_spec("numba") is not None
numba = None  # the module, once imported (the compiled functions below refer to numba.prange)
# Smallest |y_p| coordinates kept per position (see _prox_inplace): 16 covers 86% of the sub-edges that need
# a correction at 256 tokens on SmolLM2 (bench/kernel_cases.py); 8 was no faster in the kernel there.
FEW = 16


def _prox_inplace(out, probs, F, y, few):  # pragma: no cover - compiled
    """Turn ``out[h, p, j] = s_p . F_hj`` (j <= p) into ``prox(alpha[h, p, j] F_hj, y_p)``; zero j > p.

    out, probs: ``[H, T, T]`` float32; F: ``[H, T, d]``; y: ``[T, d]``; few: how many of the smallest
    ``|y_p|`` coordinates to keep per position.

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
    H, T, d = F.shape
    zero = np.float32(0.0)
    # max_d |F_hj,d| on the bits: clearing the sign bit is abs(), and non-negative floats (NaN above inf)
    # order like their bits as integers, whose max LLVM vectorises (a float max it may not reorder)
    F_bits = F.view(np.int32)
    f_max_bits = np.empty((H, T), dtype=np.int32)
    for task in numba.prange(H * T):
        h = task // T
        j = task - h * T
        m = np.int32(0)
        for k in range(d):
            m = max(m, F_bits[h, j, k] & np.int32(0x7FFFFFFF))
        f_max_bits[h, j] = m
    f_max = f_max_bits.view(np.float32)
    n_few = min(few, d)
    # per position: the n_few smallest |y_p| ascending (their coordinates and signs), then a bound that
    # every other coordinate reaches: the next smallest |y_p| (inf when there is none)
    small = np.full((T, n_few + 1), np.inf, dtype=np.float32)
    small_at = np.zeros((T, n_few + 1), dtype=np.int64)
    small_sign = np.ones((T, n_few), dtype=np.float32)
    for p in numba.prange(T):
        vals, at = small[p], small_at[p]
        for k in range(d):  # insertion into the sorted n_few + 1 smallest
            u = abs(y[p, k])
            if u < vals[n_few]:
                r = n_few
                while r > 0 and vals[r - 1] > u:
                    vals[r] = vals[r - 1]
                    at[r] = at[r - 1]
                    r -= 1
                vals[r] = u
                at[r] = k
        for r in range(n_few):
            if y[p, at[r]] < 0:
                small_sign[p, r] = -1.0
    for task in numba.prange(H * T):
        h = task // T
        p = task - h * T
        yp = y[p]
        smallest = small[p, 0]
        bound = small[p, n_few]
        for j in range(p + 1):
            a = probs[h, p, j]
            lin = a * out[h, p, j]  # a (s . F): exact when no coordinate of a F overshoots y
            if not lin > zero:  # prox = relu(lin - 2 * overshoot) with overshoot >= 0
                out[h, p, j] = zero
                continue
            thr = a * f_max[h, j]
            if thr <= smallest:  # a |F_d| <= thr <= |y_d| everywhere: nothing overshoots
                out[h, p, j] = lin
                continue
            Fj = F[h, j]
            if thr <= bound:  # only the n_few smallest coordinates can overshoot
                over = zero
                for r in range(n_few):  # zero wherever a coordinate does not overshoot
                    over += max(a * small_sign[p, r] * Fj[small_at[p, r]] - small[p, r], zero)
                v = lin - np.float32(2.0) * over
            else:
                v = zero
                for k in range(d):  # from 0 to a fixed count over contiguous rows: LLVM vectorises this
                    v += abs(yp[k]) - abs(yp[k] - a * Fj[k])
            out[h, p, j] = v if v > zero else zero
        for j in range(p + 1, T):
            out[h, p, j] = zero


def _normalise_inplace(sub, y, parts):  # pragma: no cover - compiled
    """Finish one layer's nodes: direct parts' proximities, then every part divided by the node's total.

    sub: ``[H, T, T]`` sub-edge proximities (``H`` may be 0), scaled in place; y: ``[T, d]`` the nodes;
    parts: ``[K, T, d]`` the direct parts. Returns their importances ``[K, T]``. A node whose parts all
    have proximity 0 gets 0 everywhere (not NaN).
    """
    H = sub.shape[0]
    K, T, d = parts.shape
    zero = np.float32(0.0)
    direct = np.empty((K, T), dtype=np.float32)
    for p in numba.prange(T):
        yp = y[p]
        total = 0.0  # float64
        for k in range(K):
            zp = parts[k, p]
            v = zero
            for c in range(d):  # sum_d |y_d| - |y_d - z_d|: small terms where z is small
                v += abs(yp[c]) - abs(yp[c] - zp[c])
            v = v if v > zero else zero
            direct[k, p] = v
            total += v
        for h in range(H):
            row = sub[h, p]
            acc = zero
            for j in range(p + 1):
                acc += row[j]
            total += acc
        scale = np.float32(1.0 / total) if total > 0.0 else zero
        for k in range(K):
            direct[k, p] *= scale
        for h in range(H):
            row = sub[h, p]
            for j in range(p + 1):
                row[j] *= scale
    return direct


_compiled: dict = {}
_lock = threading.Lock()


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
                raise ImportError("the CPU kernel needs numba: pip install numba")
            os.environ.setdefault("NUMBA_NUM_THREADS", str(max(1, threads)))
            import numba as _numba

            numba = _numba
            # reassoc lets LLVM vectorise the sums; no "nnan"/"ninf": a NaN from an overflowing model stays NaN
            jit = numba.njit(
                parallel=True, cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "nsz", "contract"}
            )
            _compiled["prox"] = jit(_prox_inplace)
            _compiled["normalise"] = jit(_normalise_inplace)
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    return _compiled


def prox_inplace(out: np.ndarray, probs: np.ndarray, F: np.ndarray, y: np.ndarray, threads: int) -> None:
    """Sub-edge proximities in place on ``threads`` threads (see ``_prox_inplace`` for the arrays)."""
    _kernels(threads)["prox"](out, probs, F, y, FEW)


def normalise_inplace(sub: np.ndarray, y: np.ndarray, parts: np.ndarray, threads: int) -> np.ndarray:
    """Direct parts' importances ``[K, T]``, sub-edge proximities ``[H, T, T]`` made importances in place."""
    return _kernels(threads)["normalise"](sub, y, parts)
