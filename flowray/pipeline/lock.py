"""One writer per run directory: a lease file (``lock.json``) with its owner and a heartbeat.

The lease works wherever the run does. On a local disk a free one is created exclusively (two processes
that start together cannot both create it). A bucket has no exclusive create through pyarrow, so there
(and wherever a dead owner's lease is taken over) the lease is written, left to settle (``SETTLE_S``) and
read back: of writers that raced, the last write wins and every other one sees another owner's token and
stops. The owner rewrites the heartbeat every
``stale_after_s / 4`` seconds and checks that the token is still its own (a lease taken over by another
process is noticed at the next beat, and the run stops before its manifest).

A lease is taken over when its owner is gone: on the same host when its process no longer exists (a
killed driver is resumed at once), anywhere when its heartbeat is older than ``stale_after_s``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from flowray.errors import FlowrayError
from flowray.pipeline.storage import Storage

log = logging.getLogger(__name__)
LOCK = "lock.json"
STALE_AFTER_S = 60.0  # a lease without a heartbeat for this long belongs to a dead run (any host)
# How long racing writes of the lease are given to land before it is read back: a bucket's PUTs take a
# network round trip each; a local rename is done when it returns.
SETTLE_S = {"bucket": 2.0, "local": 0.5}


class RunLockedError(FlowrayError):
    """Another live run holds the run directory's lease."""


class LockLostError(FlowrayError):
    """This run's lease was taken over by another process while it ran."""


def _process_start(pid: int) -> str | None:
    """A token of when process ``pid`` started (Linux), so a reused pid is not taken for the owner."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _boot_id() -> str | None:
    """This kernel's boot id (Linux): with the host name it tells whether a pid can be looked up here."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return started is None or _process_start(pid) in (None, started)


@dataclass(frozen=True)
class Lease:
    token: str
    host: str
    boot: str | None
    pid: int
    pid_started: str | None
    acquired: float
    heartbeat: float

    @classmethod
    def mine(cls) -> Lease:
        now = time.time()
        return cls(uuid.uuid4().hex, socket.gethostname(), _boot_id(), os.getpid(), _process_start(os.getpid()),
                   now, now)

    def owner(self) -> str:
        return f"{self.host}:{self.pid}"

    def dead_reason(self, now: float, stale_after_s: float) -> str | None:
        """Why the owner is known to be gone (None: it may be alive)."""
        here = self.host == socket.gethostname() and self.boot == _boot_id()
        if here and not _alive(self.pid, self.pid_started):
            return f"its process {self.pid} on this host no longer runs"
        if now - self.heartbeat > stale_after_s:
            return f"no heartbeat for {now - self.heartbeat:.0f} s (more than {stale_after_s:g} s)"
        return None


def read_lease(storage: Storage) -> Lease | None:
    """The lease in ``storage`` (None when there is none; a damaged one counts as held by nobody)."""
    if not storage.exists(LOCK):
        return None
    try:
        data = json.loads(storage.read_bytes(LOCK))
        return Lease(**{k: data[k] for k in Lease.__dataclass_fields__})
    except FileNotFoundError:  # released between the two calls
        return None
    except (ValueError, KeyError, TypeError):
        log.warning("%s is not a valid lease (cut while written?): treated as free", storage.path(LOCK))
        return Lease("", "?", None, 0, None, 0.0, 0.0)


def _encode(lease: Lease) -> bytes:
    return json.dumps(lease.__dict__, indent=1, sort_keys=True).encode()


class RunLock:
    """``with RunLock(storage):`` holds the run directory's lease for the block (see the module docstring).

    ``check()`` raises LockLostError once the lease was taken over; call it before anything is published.
    """

    def __init__(self, storage: Storage, *, stale_after_s: float = STALE_AFTER_S, settle_s: float | None = None):
        self.storage, self.stale_after_s = storage, stale_after_s
        self.settle_s = SETTLE_S["local" if storage.is_local else "bucket"] if settle_s is None else settle_s
        self.lease: Lease | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        mine = Lease.mine()
        current = read_lease(self.storage)
        if current is None and self.storage.is_local:
            if self.storage.create_new(LOCK, _encode(mine)):
                return self._start(mine)
            current = read_lease(self.storage)  # another process created it first
        if current is not None:
            reason = current.dead_reason(time.time(), self.stale_after_s)
            if reason is None:
                raise self._held_by(current)
            log.warning("taking over the run directory's lease from %s: %s", current.owner(), reason)
        self.storage.write_bytes(LOCK, _encode(mine))
        time.sleep(self.settle_s)  # racing writers' leases land; the last one wins
        winner = read_lease(self.storage)
        if winner is None or winner.token != mine.token:
            raise self._held_by(winner or current)
        self._start(mine)

    def _held_by(self, lease: Lease | None) -> RunLockedError:
        if lease is None:
            who = "another process (its lease vanished while this one was checked)"
        else:
            who = (f"another flowray run ({lease.owner()}, started "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(lease.acquired))}, last heartbeat "
                   f"{max(0.0, time.time() - lease.heartbeat):.0f} s ago)")
        return RunLockedError(
            f"run directory {self.storage.uri} is in use by {who}; wait for it to finish or use another "
            f"run_name. A run that died is taken over at once on its host, elsewhere after {self.stale_after_s:g} s "
            f"without a heartbeat (its lease: {self.storage.path(LOCK)})")

    def _start(self, lease: Lease) -> None:
        self.lease = lease
        self._thread = threading.Thread(target=self._beat, name="flowray-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_after_s / 4):
            try:
                current = read_lease(self.storage)
                if current is None or current.token != self.lease.token:
                    self.lost = f"now held by {current.owner() if current else 'nobody'}"
                    log.error("this run's lease on %s was taken over (%s)", self.storage.uri, self.lost)
                    return
                self.lease = Lease(**{**self.lease.__dict__, "heartbeat": time.time()})
                self.storage.write_bytes(LOCK, _encode(self.lease))
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried; only a stale lease is taken over
                log.warning("could not renew the lease on %s: %s", self.storage.uri, exc)

    def check(self) -> None:
        if self.lost:
            raise LockLostError(
                f"this run lost its lease on {self.storage.uri} ({self.lost}): another process took the run "
                "directory over, so this one stops before publishing anything; let that run finish")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)  # a beat stuck on a dead bucket must not hold the exit
        if self.lease is None or self.lost:
            return
        try:
            current = read_lease(self.storage)
            if current is not None and current.token == self.lease.token:
                self.storage.delete(LOCK)
        except Exception as exc:  # noqa: BLE001 - a lease left behind is taken over later; the run's outcome stands
            log.warning("could not release the lease on %s: %s", self.storage.uri, exc)
        self.lease = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
