"""Autoscaling and node loss with SmolLM2, on one machine (Ray's fake multi-node autoscaler).

    python scripts/autoscale_demo.py                      # 3 fake GPU nodes at most, one lost mid-run
    python scripts/autoscale_demo.py --texts 30 --no-kill    # shorter; the pool may not reach 3

A head with CPUs only and a worker node type with one CPU and one ``GPU`` resource (no hardware: each
replica's ``device: auto`` falls back to the CPU). The job asks for ``min_actors: 1``, ``actors: 3``,
``gpus_per_actor: 1``: it starts on one node, Ray Data grows the pool, the autoscaler adds nodes. Once
three replicas have committed shards, one node is killed (raylet and all its processes). At the end the
script prints which replica (host:pid, and its node) committed each shard, and the manifest's
exactly-once check. Everything runs under a private temp folder; only this cluster's processes are ended.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _node_of(cluster, pid: int):
    import psutil

    raylets = {p.pid: p for p in cluster.worker_raylets()}
    try:
        for parent in psutil.Process(pid).parents():
            if parent.pid in raylets:
                return raylets[parent.pid].environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING", str(parent.pid))[-5:]
    except psutil.Error:
        pass
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="model spec (default: the packaged SmolLM2)")
    ap.add_argument("--texts", type=int, default=120, help="texts per domain (prose, code, ioi)")
    ap.add_argument("--texts-per-shard", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--no-kill", action="store_true", help="do not kill a worker node mid-run")
    ap.add_argument("--out", default=None, help="output folder (default: a temp folder)")
    args = ap.parse_args(argv)

    from flowray.pipeline.local_cluster import LocalAutoscalingCluster

    out = Path(args.out or tempfile.mkdtemp(prefix="flowray-autoscale-"))
    cfg = {"run_name": "autoscale", "model": args.model, "output": str(out), "max_tokens": args.max_tokens,
           "texts_per_domain": args.texts, "texts_per_shard": args.texts_per_shard, "tau": [0.03],
           "actors": 3, "min_actors": 1, "gpus_per_actor": 1, "cpus_per_actor": 1, "device": "auto",
           "batch_size": 2, "general_domain": "prose", "progress_interval_s": 5,
           "corpora": [{"domain": "prose", "source": {"kind": "pydoc_topics"}},
                       {"domain": "code", "source": {"kind": "stdlib_code", "max_chars": 2000}},
                       {"domain": "ioi", "source": {"kind": "task", "task": "ioi", "variant": "original"}}]}
    cfg_path = out / "autoscale.yaml"
    out.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(cfg))
    gpu_node = {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 1, "max_workers": 3}
    cluster = LocalAutoscalingCluster(head_cpus=2, worker_node_types={"gpu_node": gpu_node})
    print(f"starting a fake autoscaling cluster (head: 2 CPUs; gpu_node: 1 CPU + 1 fake GPU, 1..3 nodes) ...")
    cluster.start(env={"RAY_AUTH_MODE": "token"})
    env = {**os.environ, **cluster.client_env,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done_dir = out / "autoscale" / "done"
    nodes: dict[str, str | None] = {}
    killed = None
    try:
        driver = subprocess.Popen([sys.executable, "-m", "flowray.cli", "job", "run", "--config", str(cfg_path)],
                                  env=env)
        while driver.poll() is None:
            for marker in done_dir.glob("*.json") if done_dir.is_dir() else ():
                worker = json.loads(marker.read_text())["worker"]
                if nodes.get(worker) is None:
                    nodes[worker] = _node_of(cluster, int(worker.rsplit(":", 1)[1]))
                    if nodes[worker]:
                        print(f"[demo] replica {worker} on node ...{nodes[worker]} committed its first shard")
            if not args.no_kill and killed is None and len({n for n in nodes.values() if n}) >= 3:
                victim = cluster.worker_raylets()[0]
                killed = victim.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING", str(victim.pid))[-5:]
                print(f"[demo] killing worker node ...{killed} (raylet pid {victim.pid}) mid-run")
                cluster.kill_node(victim)
            time.sleep(0.5)
        code = driver.returncode
    finally:
        cluster.stop()
    if code != 0:
        print(f"the job failed (exit {code})")
        return code
    markers = [json.loads(p.read_text()) for p in sorted(done_dir.glob("*.json"))]
    manifest = json.loads((out / "autoscale" / "manifest.json").read_text())
    print("\nshards committed per replica (host:pid -> node):")
    for worker, count in Counter(m["worker"] for m in markers).most_common():
        print(f"  {worker:>16}  node ...{nodes.get(worker) or '?'}  {count} shards")
    print(f"node lost mid-run: {'...' + killed if killed else 'none'}")
    print(f"every text exactly once: {manifest['every_text_exactly_once']} "
          f"({manifest['counts']['texts_in']} texts, {manifest['counts']['predictions_written']} predictions)")
    print(f"run: {out / 'autoscale'}")
    return 0 if manifest["every_text_exactly_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
