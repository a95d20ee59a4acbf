"""An autoscaling Ray cluster on one machine (Ray's fake multi-node provider), for trying the cluster path.

``ray.cluster_utils.AutoscalingCluster`` does the same but runs ``ray stop --force`` on start and on
shutdown, which kills *every* Ray process of the user on the machine (other jobs, other test runs), and
its wheel lacks the example config it reads. This helper starts its own head instead: a private temp
folder, a free GCS port, and on ``stop()`` it ends only the processes whose command line names that
folder (the head's and the fake worker nodes' raylets, GCS, workers), by pid.

Worker node types are the autoscaler's ``available_node_types`` entries, e.g.
``{"gpu_node": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 3}}``:
a ``GPU`` resource here has no hardware behind it, so an actor asking for one gets scheduled on such a
node and its model (``device: auto``) falls back to the CPU.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

_BASE = {  # the fake provider's settings, as in Ray's fake_multi_node/example.yaml
    "cluster_name": "flowray-fake", "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
    "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
    "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [], "head_node_type": "ray.head.default",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalAutoscalingCluster:
    """``start()`` -> ``address`` to ``ray.init`` -> ``worker_raylets()`` / ``kill_node()`` -> ``stop()``.

    ``start(env={"RAY_AUTH_MODE": "token"})`` gives the cluster a token of its own; a driver joins with
    ``{**os.environ, **cluster.client_env}`` (the address, the auth mode, the token).
    """

    def __init__(self, *, head_cpus: int, worker_node_types: dict, max_workers: int | None = None,
                 idle_timeout_minutes: float = 5, dashboard_port: int | None = None):
        self.head_cpus = head_cpus
        self.worker_node_types = worker_node_types
        self.max_workers = max_workers or sum(t.get("max_workers", 0) for t in worker_node_types.values())
        self.idle_timeout_minutes = idle_timeout_minutes
        # short: Ray's unix socket paths live under it and must stay below ~107 characters
        self.temp_dir = tempfile.mkdtemp(prefix="frc-", dir="/tmp")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # the jobs API (`ray job submit`) lives in the dashboard: only when asked for, and on 127.0.0.1 only
        self.dashboard_port = dashboard_port
        self.dashboard_address = f"http://127.0.0.1:{dashboard_port}" if dashboard_port else None
        self.client_env: dict[str, str] = {"RAY_ADDRESS": self.address}  # what a driver's environment adds

    def _config(self) -> dict:
        types = dict(self.worker_node_types)
        types["ray.head.default"] = {"resources": {"CPU": self.head_cpus}, "node_config": {}, "max_workers": 0}
        provider = {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                    "disable_launch_config_check": True, "gcs_address": self.address}
        return {**_BASE, "max_workers": self.max_workers, "idle_timeout_minutes": self.idle_timeout_minutes,
                "provider": provider, "available_node_types": types}

    def start(self, env: dict | None = None) -> str:
        config = Path(self.temp_dir) / "autoscaling.json"
        config.write_text(json.dumps(self._config()))
        ray_cli = str(Path(sys.executable).with_name("ray"))
        cmd = [ray_cli if os.path.exists(ray_cli) else "ray", "start", "--head", f"--port={self.port}",
               f"--num-cpus={self.head_cpus}", f"--temp-dir={self.temp_dir}", f"--autoscaling-config={config}",
               "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
        if self.dashboard_port:
            cmd += ["--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        else:
            cmd += ["--include-dashboard=false"]
        env = dict(env or {})
        if env.get("RAY_AUTH_MODE") == "token":
            # a token of its own, so that a machine without ~/.ray/auth_token starts it too: Ray reads
            # RAY_AUTH_TOKEN before any token file; the fake worker nodes inherit it from the head, and
            # drivers get it from ``client_env``
            env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
            self.client_env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": env["RAY_AUTH_TOKEN"]})
        full_env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1", **env}
        subprocess.run(cmd, env=full_env, check=True, capture_output=True, text=True, timeout=180)
        log.info("fake autoscaling cluster up at %s (temp dir %s)", self.address, self.temp_dir)
        return self.address

    # --- nodes -----------------------------------------------------------------------------------
    def _own_processes(self) -> list:
        import psutil

        mine = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if proc.pid != os.getpid() and any(self.temp_dir in part for part in proc.info["cmdline"] or ()):
                    mine.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return mine

    def worker_raylets(self) -> list:
        """The raylet processes of the fake worker nodes (the head's is the one started with --head)."""
        import psutil

        out = []
        for proc in self._own_processes():
            try:
                cmd = " ".join(proc.cmdline())
                if "raylet" in Path(proc.cmdline()[0]).name and "--head" not in cmd:
                    env = proc.environ()
                    if env.get("RAY_NODE_TYPE_NAME", "ray.head.default") != "ray.head.default":
                        out.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
                continue
        return out

    def wait_for_workers(self, n: int, timeout: float) -> bool:
        """Wait until ``n`` fake worker nodes run (e.g. the ``min_workers`` ones); False after ``timeout`` s."""
        deadline = time.time() + timeout
        while len(self.worker_raylets()) < n:
            if time.time() > deadline:
                return False
            time.sleep(0.5)
        return True

    def monitor_log_tail(self, lines: int = 40) -> str:
        """The last lines of the autoscaler's logs (``monitor.*``), to say why nodes did not come."""
        out = []
        for path in sorted(Path(self.temp_dir).glob("session_latest/logs/monitor.*")):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out) or f"no monitor logs under {self.temp_dir}"

    def kill_node(self, raylet) -> None:
        """Lose a worker node: its raylet and the workers it started die at once (SIGKILL)."""
        import psutil

        victims = [raylet, *raylet.children(recursive=True)]
        for proc in victims:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        log.info("killed worker node raylet pid %d and %d children", raylet.pid, len(victims) - 1)

    def stop(self) -> None:
        """End only this cluster's processes (by pid), then remove its temp folder."""
        import psutil

        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            procs = self._own_processes()
            for proc in list(procs):  # workers retitle themselves (ray::...): found through their raylet
                try:
                    procs += [c for c in proc.children(recursive=True) if c not in procs]
                except psutil.NoSuchProcess:
                    pass
            for proc in procs:
                try:
                    proc.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(procs, timeout=wait)
        deadline = time.time() + 10
        while self._own_processes() and time.time() < deadline:
            time.sleep(0.2)
        if not os.environ.get("FLOWRAY_KEEP_CLUSTER_DIR"):  # its logs, for a post-mortem
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalAutoscalingCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
