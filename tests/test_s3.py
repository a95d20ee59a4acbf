"""Buckets for real: the job writes to ``s3://`` on a local S3 server (moto's server mode), its driver is
killed mid-run and resumed, and the analysis notebooks read the finished run straight from the bucket.

Endpoint and credentials reach every process (driver, Ray workers, notebook kernels) the standard way,
through ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_DEFAULT_REGION``:
pyarrow's S3FileSystem (the job) and polars (the notebooks) both read them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO, SHARED_DATA, needs_shared
from quiet import assert_quiet

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
BUCKET = "flowray-test"


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on a free localhost port, the AWS variables pointing at it, one bucket."""
    moto_server = pytest.importorskip("moto.server", reason="pip install 'moto[server]' (dev extra)")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
    server.stop()


def _s3():
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(f"s3://{BUCKET}")[0]


def _keys(prefix: str) -> list[str]:
    import pyarrow.fs as pafs

    infos = _s3().get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", allow_not_found=True))
    return [i.path for i in infos if i.type == pafs.FileType.File]


def _job_args(tiny_model_dir) -> tuple[list[str], int]:
    """The shipped shared-data config on a tiny model when ../shared is there, else a small config of our own."""
    common = ["--set", "run_name=s3run", "--set", f"output=s3://{BUCKET}/runs", "--set", f"model={tiny_model_dir}",
              "--set", "max_tokens=16", "--set", "texts_per_shard=1", "--set", "actors=1"]
    if SHARED_DATA.is_dir():
        return ["--config", "shared_data", "--set", "texts_per_domain=3", *common], 13 * 3
    return ["--config", "default", "--set", "texts_per_domain=6", *common], 8 * 6


@pytest.fixture(scope="module")
def s3_run(s3_env, tiny_model_dir):
    """A run written to s3://flowray-test/runs/s3run: killed after a few shards, then resumed to the end."""
    args, n_shards = _job_args(tiny_model_dir)
    cmd = [sys.executable, "-m", "flowray.cli", "job", "run", *args]
    env = {**os.environ, **s3_env, "FLOWRAY_SHARED_DATA": str(SHARED_DATA)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(_keys("runs/s3run/done")) < 2:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the embedded Ray it started, mid-run
    proc.wait()
    time.sleep(2)  # a PUT the server had already received when the client died still lands
    before = len(_keys("runs/s3run/done"))
    assert 2 <= before < n_shards, f"the kill should land mid-run ({before} of {n_shards} shards done)"
    assert not _keys("runs/s3run/manifest.json")
    t0 = time.time()
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    print(f"resume took {time.time() - t0:.0f} s")
    assert again.returncode == 0, again.stderr[-4000:]
    return {"uri": f"s3://{BUCKET}/runs/s3run", "resumed": before, "shards": n_shards, "stdout": again.stdout,
            "output": again.stdout + again.stderr}


def test_a_run_in_a_bucket_survives_a_driver_kill_and_resumes(s3_run):
    import polars as pl

    manifest = json.loads(_s3().open_input_stream(f"{BUCKET}/runs/s3run/manifest.json").read())
    assert manifest["every_text_exactly_once"]
    assert manifest["counts"]["shards"] == s3_run["shards"]
    assert manifest["counts"]["shards_resumed"] == s3_run["resumed"]
    preds = pl.read_parquet(f"{s3_run['uri']}/predictions/*.parquet")  # polars reads the AWS variables too
    assert preds.height == manifest["counts"]["predictions_written"]
    assert preds.select("domain", "doc_id", "position").is_duplicated().sum() == 0
    assert f"{s3_run['uri']}/summary.md" in s3_run["stdout"]
    assert not [k for k in _keys("runs/s3run/done") if "/.tmp-" in k]  # objects are written whole
    assert not os.path.exists(REPO / "s3:")  # nothing went to a local folder named after the URI
    assert_quiet(s3_run["output"])  # the embedded run (the demo's path): flowray's progress, not Ray's notices


# Every notebook reads a run through analysis/common.py (open_run, Run.table, Run.predictions); these two use
# all three, and tests/test_analysis.py runs all five through file:// URIs. FLOWRAY_S3_NOTEBOOKS=all runs the
# five here too (~95 s more on a 2-core machine).
S3_NOTEBOOKS = ("ioi_greater_than", "bottom_to_top")


@needs_shared
def test_the_notebooks_read_the_run_from_the_bucket(s3_run, tmp_path):
    sys.path.insert(0, str(REPO / "analysis"))
    import run_all

    for name in run_all.NOTEBOOKS if os.environ.get("FLOWRAY_S3_NOTEBOOKS") == "all" else S3_NOTEBOOKS:
        t0 = time.time()
        run_all.execute_notebook(name, run=s3_run["uri"], figures=str(tmp_path / name),
                                 params={"pos": {"N_POINTS": 200, "PERPLEXITY": 10.0}}.get(name), timeout=600)
        pngs = list((tmp_path / name).glob("*.png"))
        assert pngs and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs), name
        print(f"{name}: {time.time() - t0:.0f} s")


def test_an_unreachable_bucket_fails_with_the_settings_to_check(s3_env, tmp_path):
    from flowray.errors import FlowrayError
    from flowray.pipeline.storage import Storage

    with pytest.raises(FlowrayError, match="AWS_ENDPOINT_URL") as info:
        Storage("s3://no-such-bucket-here/runs/x").write_json("probe.json", {"a": 1})
    assert "no-such-bucket-here" in str(info.value)


def test_one_writer_per_run_directory_in_a_bucket(s3_env):
    """No exclusive create through pyarrow: the lease is written, left to settle and read back."""
    import os

    from test_lock import race

    from flowray.pipeline.lock import RunLock, RunLockedError
    from flowray.pipeline.storage import Storage

    uri = f"s3://{BUCKET}/runs/leased"
    outs = race(uri, settle_s=1.0, env={**os.environ, **s3_env})
    assert sorted(o.split()[0] for o in outs) == ["OWNER", "REFUSED", "REFUSED"], outs
    assert not _keys("runs/leased/lock.json"), "the owner releases the lease"
    holder = RunLock(Storage(uri), settle_s=0.5)
    holder.acquire()
    try:
        with pytest.raises(RunLockedError, match=f"{uri} is in use by another flowray run"):
            RunLock(Storage(uri), settle_s=0.5).acquire()
    finally:
        holder.release()
