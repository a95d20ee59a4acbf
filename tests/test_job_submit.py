"""`ray start --head` + `ray job submit` of the corpus job, as a cluster user runs it; head stopped after."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_against_a_local_head(tmp_path, tiny_model_dir):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"Sentence number {i} is short."}) for i in range(6)))
    cfg = {"run_name": "submitted", "model": str(tiny_model_dir), "output": str(tmp_path / "runs"),
           "max_tokens": 12, "texts_per_shard": 2, "tau": [0.03], "actors": 2,
           "corpora": [{"domain": "c", "source": {"kind": "jsonl", "paths": [str(corpus)], "text_field": "text"}}]}
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    port, dash = _free_port(), _free_port()
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
    try:
        for attempt in range(10):  # the head's job agent can start a few seconds after `ray start` returns
            proc = subprocess.run(
                [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO),
                 "--", sys.executable, "jobs/flow_routes.py", "--config", str(cfg_path)],
                env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
            if "No available agent to submit job" not in proc.stderr + proc.stdout:
                break
            time.sleep(3)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "succeeded" in proc.stdout
        assert "run submitted: 6 texts" in proc.stdout  # the job's own closing lines, streamed back
        run = tmp_path / "runs" / "submitted"
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["every_text_exactly_once"] and manifest["counts"]["texts_in"] == 6
        # exactly once, from the files themselves: each of the 6 texts in the predictions, none twice
        import polars as pl

        preds = pl.read_parquet(run / "predictions" / "*.parquet")
        assert sorted(preds["doc_id"].unique().to_list()) == [f"c.jsonl:{i:06d}" for i in range(6)]
        assert preds.select("doc_id", "position").is_duplicated().sum() == 0
        assert manifest["counts"]["error_rows"] == 0
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
