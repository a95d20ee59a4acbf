"""SIGTERM as an interrupt: ``kill``, a scheduler or a container stop ends flowray the way Ctrl-C does
(cleanup runs, the CLI prints one line and exits with 143)."""

from __future__ import annotations

import signal
import threading

from flowray.errors import Terminated


def _terminate(signum, frame):
    raise Terminated()


def raise_on_sigterm() -> None:
    """Turn SIGTERM into ``Terminated`` in this process (main thread only). Call it again after a library
    installs a handler of its own: ``ray.init`` installs one that exits mid-stage."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
