"""Can the cluster ever place one model actor? Pure checks on node resource lists (no Ray started)."""

from __future__ import annotations

import logging

import pytest

from flowray.errors import ConfigError
from flowray.pipeline.resources import actor_request, check_actor_fits, fits

CPU_ONLY = [{"CPU": 2.0, "memory": 1e9}]
GPU_NODE = [{"CPU": 8.0}, {"CPU": 8.0, "GPU": 1.0}]


def test_a_gpu_request_on_cpu_nodes_without_an_autoscaler_fails_with_the_fix():
    with pytest.raises(ConfigError, match=r"each asks for \{CPU: 1, GPU: 1\}, the nodes offer \{CPU: 2, GPU: 0\}, "
                       r"and no autoscaler .*set gpus_per_actor: 0 and device: cpu"):
        check_actor_fits(actor_request(1, 1), CPU_ONLY, autoscaler=False)


def test_one_node_must_hold_the_whole_request():
    assert fits(actor_request(4, 1), GPU_NODE)
    assert not fits(actor_request(9, 1), GPU_NODE)  # 16 CPUs in the cluster, but 8 per node
    assert fits(actor_request(0.5, 0), CPU_ONLY) and not fits(actor_request(3, 0), CPU_ONLY)
    with pytest.raises(ConfigError, match="lower cpus_per_actor"):
        check_actor_fits(actor_request(3, 0), CPU_ONLY, autoscaler=False)


def test_with_an_autoscaler_it_warns_and_waits(caplog):
    with caplog.at_level(logging.WARNING, logger="flowray.pipeline.resources"):
        check_actor_fits(actor_request(1, 1), CPU_ONLY, autoscaler=True)
    assert "waiting for the autoscaler" in caplog.text


def test_no_ray_means_no_autoscaler_known():
    from flowray.pipeline.resources import _autoscaler_running

    assert _autoscaler_running(wait_s=0) is False


def test_a_plain_rays_read_only_node_types_are_no_autoscaler():
    from flowray.pipeline.resources import _configured_node_types

    laptop = {"node_type_mapping": {"a0fa": "node_a0fa"}, "legacy": True}  # as ray.init() reports itself
    cluster = {"node_type_mapping": {"a0fa": "ray.head.default"}}  # a cluster.yaml's node types
    assert not _configured_node_types(laptop) and _configured_node_types(cluster)
    assert not _configured_node_types({})
