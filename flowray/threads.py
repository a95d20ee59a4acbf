"""How long flowray's idle CPU threads busy-wait before they sleep: briefly, so that on a shared machine
they hand their core back.

torch (its bundled GNU OpenMP) and the CPU kernel (numba, on the system's GNU OpenMP) each keep a pool
of threads. After a parallel region an idle GNU OpenMP thread spins ``GOMP_SPINCOUNT`` times (300,000
when it is unset) before it sleeps. On an idle machine that saves a wake-up per region. When another
process competes for the cores, a spinning thread holds a core that the thread with work is waiting for,
and work made of many short regions (the per-layer importances, small batches) slows the most.

The measurements below are from ``flowray compare``'s phases side by side on 2 cores, with one busy-loop
process competing:
- default spin: batched routes 245 ms per prompt, per-head patching (batches of 128) 93 ms per pass;
- ``GOMP_SPINCOUNT=1000``: 137 to 145 ms and 68 to 74 ms.
Quiet, the two settings were within the machine's noise.

The ``flowray`` command (and so the jobs) calls ``prefer_short_spin()`` before anything loads torch.
A value the user set is kept. A library user who wants the same sets the variable before importing torch.
"""

from __future__ import annotations

import os
import sys

SPIN_VARIABLE = "GOMP_SPINCOUNT"
SHORT_SPIN = "1000"


def prefer_short_spin(environ=None) -> bool:
    """Set ``GOMP_SPINCOUNT`` to ``SHORT_SPIN`` unless it is set.

    Returns whether it takes effect for torch's pool, i.e. whether torch has not been imported yet (GNU
    OpenMP reads the variable once, as it loads). Numba's pool reads it at the first parallel kernel call.
    Ray workers started from this process inherit it.
    """
    env = os.environ if environ is None else environ
    env.setdefault(SPIN_VARIABLE, SHORT_SPIN)
    return "torch" not in sys.modules


def spin_setting() -> str | None:
    """What this process's environment says (None: GNU OpenMP's default), for reports."""
    return os.environ.get(SPIN_VARIABLE)
