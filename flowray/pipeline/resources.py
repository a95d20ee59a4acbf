"""Can this cluster ever place one model actor? Checked before the map stage, so an impossible request
(``gpus_per_actor: 1`` on a machine without a GPU) fails in a second instead of waiting forever."""

from __future__ import annotations

import json
import logging
import socket
import time
from urllib.parse import urlsplit

from flowray.errors import ConfigError

log = logging.getLogger(__name__)


def actor_request(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}


def fits(request: dict[str, float], nodes: list[dict[str, float]]) -> bool:
    """Whether one node offers every resource of ``request`` (an actor never spans nodes)."""
    return any(all(node.get(k, 0.0) >= v for k, v in request.items()) for node in nodes)


def check_actor_fits(request: dict[str, float], nodes: list[dict[str, float]], *, autoscaler: bool) -> None:
    """ConfigError when no node (and no autoscaler) can ever give one actor ``request``."""
    if fits(request, nodes):
        return
    have = ", ".join(
        "{" + ", ".join(f"{k}: {node.get(k, 0):g}" for k in ("CPU", "GPU")) + "}" for node in nodes) or "no nodes"
    wanted = ", ".join(f"{k}: {v:g}" for k, v in request.items())
    if autoscaler:
        log.warning("no node offers one actor's resources ({%s}) yet (nodes: %s); waiting for the autoscaler "
                    "to add one (a request no node type can satisfy waits forever: check cluster.yaml)",
                    wanted, have)
        return
    fix = ("set gpus_per_actor: 0 and device: cpu (or auto) to run on CPUs, or run on a cluster with GPU nodes"
           if request.get("GPU") else "lower cpus_per_actor, or add bigger nodes")
    raise ConfigError(
        f"no node of this Ray cluster can run one model actor: each asks for {{{wanted}}}, the nodes offer "
        f"{have}, and no autoscaler is configured to add nodes; {fix}")


def _configured_node_types(report: dict) -> bool:
    """Whether the autoscaler's report names real node types (a cluster config), not the read-only
    provider's anonymous ``node_<id>`` ones that every plain Ray (a laptop, ``ray start``) reports."""
    mapping = report.get("node_type_mapping") or {}
    return any(kind != f"node_{node}" for node, kind in mapping.items())


def _autoscaler_running(wait_s: float = 15.0) -> bool:
    """A Ray autoscaler with a cluster config (node types it can launch) is running.

    Ray's monitor reports every few seconds after the head starts: wait up to ``wait_s`` for its report.
    """
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

        if is_autoscaler_v2():
            return True  # v2 reports differently; assume it may add nodes (warn, never refuse wrongly)
        deadline = time.time() + wait_s
        while _internal_kv_initialized():
            raw = _internal_kv_get("__autoscaling_status")  # ray_constants.DEBUG_AUTOSCALING_STATUS
            report = json.loads(raw).get("autoscaler_report") if raw else None
            if report:
                return _configured_node_types(report)
            if time.time() > deadline:
                break
            time.sleep(0.5)
    except Exception:  # noqa: BLE001 - private APIs may move: fall back to "no autoscaler known"
        log.debug("could not read the autoscaler status", exc_info=True)
    return False


def check_cluster_resources(cpus_per_actor: float, gpus_per_actor: float) -> None:
    """Call after ``ray.init``: fail fast when no node of the cluster can ever host one actor."""
    import ray

    request = actor_request(cpus_per_actor, gpus_per_actor)
    nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    if not fits(request, nodes):  # only then ask about an autoscaler (which may take a few seconds)
        check_actor_fits(request, nodes, autoscaler=_autoscaler_running())


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a cluster address (``host:port`` or ``ray://host:port``); None for ``auto``/``local``."""
    if address in ("auto", "local"):
        return None
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ConfigError(f"RAY_ADDRESS={address!r} is not a cluster address; expected host:port (the head's GCS, "
                          "e.g. 10.0.0.5:6379), ray://host:10001, or unset it to run on an embedded local Ray")
    return parts.hostname, port


def check_ray_address(address: str, timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for something to answer at ``address``; ConfigError if nothing does.

    Ray itself retries an unreachable head for minutes, printing a line every few seconds.
    """
    target = _host_port(address)
    if target is None:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            socket.create_connection(target, timeout=max(0.1, min(5.0, left))).close()
            return
        except OSError as exc:
            if left <= 0.5:
                raise ConfigError(
                    f"RAY_ADDRESS={address!r}: no Ray cluster answers there ({exc}; waited {timeout_s:g} s); start "
                    "it (ray start --head), fix the address, or unset RAY_ADDRESS to run on an embedded local Ray "
                    "(ray_connect_timeout_s sets the wait)") from None
            time.sleep(min(0.5, max(0.0, left - 0.5)))
