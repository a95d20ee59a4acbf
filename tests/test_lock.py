"""One writer per run directory: the lease file, raced by real processes, taken over from dead owners."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from flowray.pipeline.lock import LOCK, Lease, LockLostError, RunLock, RunLockedError, read_lease
from flowray.pipeline.storage import Storage

# Each process waits for the same start time, then tries to take the lease and holds it for a while.
RACER = """
import sys, time
from flowray.pipeline.lock import RunLock, RunLockedError
from flowray.pipeline.storage import Storage
uri, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time() - 0.02))
while time.time() < start:  # the last few ms spun, so the processes leave together
    pass
try:
    with RunLock(Storage(uri), settle_s=float(sys.argv[3])):
        print("OWNER", flush=True)
        time.sleep(1.0)
except RunLockedError as exc:
    print("REFUSED", exc)
"""


def race(uri: str, n: int = 3, settle_s: float = 0.2, env=None) -> list[str]:
    """Start ``n`` processes that ask for the lease of ``uri`` at the same instant; their outputs."""
    start = time.time() + 1.5  # every interpreter has started and imported flowray by then
    procs = [subprocess.Popen([sys.executable, "-c", RACER, uri, str(start), str(settle_s)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(n)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    return [out for out, _ in outs]


def test_processes_started_together_get_one_owner_and_clear_refusals(tmp_path):
    outs = race(str(tmp_path / "run"))
    assert sorted(o.split()[0] for o in outs) == ["OWNER", "REFUSED", "REFUSED"]
    refusal = next(o for o in outs if o.startswith("REFUSED"))
    assert "is in use by another flowray run" in refusal and "use another run_name" in refusal
    assert not (tmp_path / "run" / LOCK).exists(), "the owner releases the lease"


def _write_lease(storage: Storage, **fields) -> None:
    lease = {"token": "t0", "host": "elsewhere", "boot": None, "pid": 1, "pid_started": None,
             "acquired": time.time(), "heartbeat": time.time(), **fields}
    storage.write_json(LOCK, lease)


def test_a_lease_is_taken_over_only_when_its_owner_is_gone(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    _write_lease(storage)  # a live run on another host
    with pytest.raises(RunLockedError, match=r"in use by another flowray run \(elsewhere:1, .*last heartbeat 0 s"):
        RunLock(storage, settle_s=0).acquire()
    _write_lease(storage, heartbeat=time.time() - 120)  # that host went silent
    with RunLock(storage, settle_s=0) as lock:
        assert read_lease(storage).token == lock.lease.token
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    here = Lease.mine()  # this host's name and boot id
    _write_lease(storage, host=here.host, boot=here.boot, pid=int(dead.stdout))  # a driver killed a moment ago
    with RunLock(storage, settle_s=0) as lock:
        assert read_lease(storage).token == lock.lease.token


def test_a_lease_taken_over_stops_the_run_before_it_publishes(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    lock = RunLock(storage, stale_after_s=0.2, settle_s=0)
    lock.acquire()
    try:
        _write_lease(storage, token="intruder", host="other")
        time.sleep(0.3)  # the next heartbeat sees the other token
        with pytest.raises(LockLostError, match="lost its lease .*now held by other:1"):
            lock.check()
    finally:
        lock.release()
    assert json.loads((tmp_path / "run" / LOCK).read_text())["token"] == "intruder", "another's lease is kept"


def test_a_second_job_on_a_held_run_directory_is_refused_before_any_work(tmp_path):
    from flowray.config import JobConfig
    from flowray.pipeline.job import run_job

    config = JobConfig.from_dict({"corpora": [{"domain": "d", "source": {"kind": "pydoc_topics"}}],
                                  "output": str(tmp_path / "runs"), "run_name": "busy"})
    storage = Storage(str(tmp_path / "runs" / "busy"))
    _write_lease(storage)
    with pytest.raises(RunLockedError, match="runs/busy is in use by another flowray run"):
        run_job(config)
    assert storage.list("") == [LOCK], "nothing was written beside the other run's lease"
