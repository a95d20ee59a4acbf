"""Autoscaling and node loss, for real, on one machine: Ray's fake multi-node autoscaler.

The head has CPUs only; the worker node type has one CPU and one ``GPU`` resource with no hardware behind
it. The job asks for ``min_actors: 1``, ``actors: 3``, ``gpus_per_actor: 1``: the autoscaler adds a node
for the first replica, then more as Ray Data grows the pool, and each replica's model (``device: auto``)
falls back to the CPU. A replica that has committed a shard is stalled (SIGSTOP) until the pool has grown, so
that however fast the replicas are, work is left when the nodes arrive (a stall ends after 4 minutes, so a
pool that never grows fails the test with the autoscaler's log rather than hanging it). Once three replicas on
three nodes have committed shards, they resume and one worker node is killed (its raylet and everything on it,
SIGKILL); the run must still finish with every text exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import yaml
from quiet import assert_quiet

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture
def fake_cluster():
    from flowray.pipeline.local_cluster import LocalAutoscalingCluster

    # min_workers 1: the node the job starts on is up before it (saves a node start); two more are autoscaled
    gpu_node = {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 1, "max_workers": 3}
    failures = []
    for _attempt in range(2):  # Ray's fake autoscaler is the harness here, not the subject: a second start
        cluster = LocalAutoscalingCluster(head_cpus=2, worker_node_types={"gpu_node": gpu_node})
        cluster.start(env={"RAY_AUTH_MODE": "token"})
        # the job starts on a pool that exists: the min_workers node is up
        if cluster.wait_for_workers(1, timeout=120):
            break
        failures.append(cluster.monitor_log_tail())
        cluster.stop()
    else:
        pytest.fail("the fake autoscaler started no worker node in 120 s, twice:\n" + "\n".join(failures))
    if failures:
        warnings.warn("the fake autoscaler's first cluster started no worker node in 120 s; the second did:\n"
                      + failures[0][-2000:])
    try:
        yield cluster
    finally:
        cluster.stop()
    assert not cluster._own_processes(), "the fake cluster left processes behind"


def _corpus(tmp_path, n):
    path = tmp_path / "notes.jsonl"
    body = " ".join(f"the quick brown fox number {k} jumps over the lazy dog" for k in range(12))  # > 64 tokens
    path.write_text("".join(json.dumps({"text": f"Note {i}: {body}"}) + "\n" for i in range(n)))
    return path


def _node_of(cluster, pid: int) -> int | None:
    """The raylet pid (= the fake node) that started worker process ``pid``, if both are alive."""
    import psutil

    raylets = {p.pid for p in cluster.worker_raylets()}
    try:
        proc = psutil.Process(pid)
        for parent in proc.parents():
            if parent.pid in raylets:
                return parent.pid
    except psutil.NoSuchProcess:
        pass
    return None


def _signal(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def test_pool_grows_to_three_nodes_and_survives_losing_one(tmp_path, tiny_model_dir, fake_cluster):
    n = 90  # one text per shard
    cfg = {"run_name": "auto", "model": str(tiny_model_dir), "output": str(tmp_path / "runs"), "max_tokens": 20,
           "texts_per_domain": n, "texts_per_shard": 1, "tau": [0.05], "actors": 3, "min_actors": 1,
           "gpus_per_actor": 1, "cpus_per_actor": 1, "device": "auto", "batch_size": 1, "general_domain": "notes",
           "progress_interval_s": 2,
           "corpora": [{"domain": "notes", "source": {"kind": "jsonl", "paths": [str(_corpus(tmp_path, n))]}}]}
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, **fake_cluster.client_env}
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "flowray.cli", "job", "run", "--config", str(cfg_path)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    done_dir = tmp_path / "runs" / "auto" / "done"
    nodes_of_worker: dict[str, int | None] = {}  # "host:pid" of a replica -> the raylet pid of its node
    seen: set[str] = set()
    stalled: set[int] = set()
    killed = done_at_kill = None
    deadline = time.time() + 420
    stall_until = None  # stalled replicas resume after 240 s whatever the pool: a clear failure, not a hang
    try:
        while driver.poll() is None and time.time() < deadline:
            if stalled and time.time() > stall_until:  # set with the first stall
                _signal(stalled, signal.SIGCONT)
                stalled.clear()
            for marker in done_dir.glob("*.json") if done_dir.is_dir() else ():
                if marker.name in seen:
                    continue
                seen.add(marker.name)
                worker = json.loads(marker.read_text())["worker"]
                if nodes_of_worker.get(worker) is None:
                    pid = int(worker.rsplit(":", 1)[1])
                    nodes_of_worker[worker] = _node_of(fake_cluster, pid)
                    if killed is None and nodes_of_worker[worker]:
                        # A replica that has committed a shard stalls (SIGSTOP) until the pool has grown:
                        # the replicas' speed then cannot end the run before the autoscaler adds nodes.
                        _signal([pid], signal.SIGSTOP)
                        stalled.add(pid)
                        stall_until = stall_until or time.time() + 240
            if killed is None and len({node for node in nodes_of_worker.values() if node}) >= 3:
                _signal(stalled, signal.SIGCONT)
                victim = fake_cluster.worker_raylets()[0]
                killed, done_at_kill = victim.pid, len(seen)
                fake_cluster.kill_node(victim)
            time.sleep(0.1)
    finally:
        _signal(stalled, signal.SIGCONT)
        if driver.poll() is None:
            driver.kill()
        log.close()
    output = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 0, f"{output[-4000:]}\n{fake_cluster.monitor_log_tail()}"
    assert killed is not None, (f"the pool never reached 3 replicas on 3 nodes: {nodes_of_worker}\n{output[-3000:]}\n"
                                f"{fake_cluster.monitor_log_tail()}")
    assert done_at_kill < n, "the node was lost after the run had finished"
    # three replicas, each on its own fake GPU node, took shards before the node loss
    assert len({node for node in nodes_of_worker.values() if node}) >= 3, nodes_of_worker
    assert_quiet(output)  # a driver joining a cluster: flowray's progress, not Ray's notices
    run_dir = tmp_path / "runs" / "auto"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["every_text_exactly_once"] and manifest["counts"]["texts_in"] == n
    assert manifest["counts"]["error_rows"] == 0
    markers = [json.loads(p.read_text()) for p in (run_dir / "done").glob("*.json")]
    assert len(markers) == n and len({m["worker"] for m in markers}) >= 3
