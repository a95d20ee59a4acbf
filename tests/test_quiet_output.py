"""What a user reads: the demo (embedded Ray) and `ray job submit` logs show flowray's progress and summary;
Ray's internal notices are dropped (token auth, progress bars) or explained (core_worker.cc's
constructor-arguments line), and real errors still come through.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO
from quiet import assert_quiet

pytestmark = pytest.mark.slow


def _job(tmp_path, model_dir, name: str):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"Sentence number {i} is short."}) for i in range(4)))
    cfg = {"run_name": name, "model": str(model_dir), "output": str(tmp_path / "runs"), "max_tokens": 12,
           "texts_per_shard": 2, "tau": [0.03], "actors": 1, "progress_interval_s": 0.1,
           "corpora": [{"domain": "c", "source": {"kind": "jsonl", "paths": [str(corpus)], "text_field": "text"}}]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _check(output: str, name: str) -> None:
    assert_quiet(output)
    assert f"run {name}: 4 texts" in output  # flowray's summary


# The embedded run (the demo's path) is checked on the S3 test's resumed run (tests/test_s3.py) and the
# joined-cluster driver on the autoscaling test's, so no extra job runs for it here.


@pytest.mark.cluster
def test_ray_job_submit_logs_show_flowray_not_ray_notices(tmp_path, tiny_model_dir):
    from flowray.pipeline.local_cluster import LocalAutoscalingCluster, free_port

    head = LocalAutoscalingCluster(head_cpus=2, worker_node_types={}, dashboard_port=free_port())
    head.start(env={"RAY_AUTH_MODE": "token"})
    env = {**os.environ, **head.client_env, "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        proc = subprocess.run(
            [str(os.path.join(os.path.dirname(sys.executable), "ray")), "job", "submit", "--address",
             head.dashboard_address, "--working-dir", str(REPO), "--", sys.executable, "jobs/flow_routes.py",
             "--config", str(_job(tmp_path, tiny_model_dir, "submitted"))],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    finally:
        head.stop()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check(proc.stdout + proc.stderr, "submitted")


def test_the_filters_drop_only_those_notices(caplog):
    from flowray.pipeline.job import RAY_NOTICES, quiet_ray_notices

    quiet_ray_notices()
    quiet_ray_notices()  # idempotent: one filter per notice
    for name, prefix, _why in RAY_NOTICES:
        logger = logging.getLogger(name)
        assert len(logger.filters) == 1
        with caplog.at_level(logging.WARNING, logger=name):
            caplog.clear()
            logger.warning(prefix + " ... the rest of Ray's message")
            logger.warning("Token authentication is disabled for this Ray cluster")  # a real warning passes
            logger.error("something actually failed")
        assert [r.getMessage() for r in caplog.records] == ["Token authentication is disabled for this Ray cluster",
                                                            "something actually failed"]
