"""cluster.yaml against Ray's own autoscaler schema (offline); broken copies must fail; the KubeRay example."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _validate(cfg: dict) -> None:
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.Draft7Validator(schema).validate(cfg)
    validate_config(prepare_config(copy.deepcopy(cfg)))


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema(cluster):
    _validate(cluster)
    gpu = cluster["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["resources"]["GPU"] >= 1  # GPU workers scale from zero
    assert any("pip install" in c and "flowray" in c for c in cluster["setup_commands"])


def _broken(cluster, edit):
    cfg = copy.deepcopy(cluster)
    edit(cfg)
    return cfg


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=0),  # typo of min_workers
     r"'min_worker' was unexpected"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=12),  # more than max
     r"max_workers` is smaller than the sum of `min_workers`"),
    (lambda c: c["available_node_types"]["gpu_worker"].pop("resources"), r"'resources' is a required property"),
    (lambda c: c.update(head_node_type="cpu_head"),  # no such node type
     r"`head_node_type` must be one of `available_node_types`"),
    (lambda c: c.pop("provider"), r"'provider' is a required property"),
])
def test_broken_copies_fail(cluster, edit, message):
    broken = _broken(cluster, edit)  # outside pytest.raises: an edit that itself fails must not pass
    assert broken != cluster
    with pytest.raises((jsonschema.ValidationError, ValueError), match=message):
        _validate(broken)


def test_kuberay_rayjob_example_runs_our_entry_point():
    from flowray.config import JobConfig

    job = yaml.safe_load((REPO / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    entry = job["spec"]["entrypoint"].split()
    assert entry[0] == "python" and (REPO / entry[1]).is_file()
    JobConfig.from_yaml(REPO / entry[entry.index("--config") + 1])  # the cluster config validates offline
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and workers["minReplicas"] == 0
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert os.path.basename(entry[1]) == "flow_routes.py"
