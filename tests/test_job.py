"""The whole corpus job on an embedded local Ray: two actors, several shards, crashes, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest
import yaml

from flowray.config import JobConfig
from flowray.errors import ConfigError, FlowrayError, InputError

pytestmark = pytest.mark.slow


def _write_corpus(tmp_path, n=10):
    path = tmp_path / "notes.jsonl"
    lines = [json.dumps({"body": f"Note {i}: the quick brown fox jumps over {i} lazy dogs."}) for i in range(n)]
    lines[3] = json.dumps({"body": "  "})  # an empty text: must become an error row, not kill the job
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(tmp_path, model_dir, n_notes=10, **extra) -> dict:
    return {
        "run_name": "t", "model": str(model_dir), "output": str(tmp_path / "runs"), "max_tokens": 20,
        "texts_per_domain": 10, "texts_per_shard": 2, "tau": [0.02, 0.05], "actors": 2, "batch_size": 2,
        "general_domain": "notes", "progress_interval_s": 0.5,
        "corpora": [
            {"domain": "notes", "source": {"kind": "jsonl", "paths": [str(_write_corpus(tmp_path, n_notes))], "text_field": "body"}},
            {"domain": "ioi", "texts": 4, "source": {"kind": "task", "task": "ioi", "variant": "original"}},
        ],
        **extra,
    }


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _check_exactly_once(run_dir, expected_texts):
    preds = pl.read_parquet(f"{run_dir}/predictions/*.parquet")
    errors = pl.read_parquet(f"{run_dir}/errors/*.parquet")
    docs = preds.select("domain", "doc_id").unique()
    ids = [(r["domain"], r["doc_id"]) for r in docs.iter_rows(named=True)]
    ids += [(r["domain"], r["doc_id"]) for r in errors.iter_rows(named=True)]
    assert len(ids) == len(set(ids)) == expected_texts
    # no prediction row written twice
    assert preds.select("domain", "doc_id", "position").is_duplicated().sum() == 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["every_text_exactly_once"]
    assert manifest["counts"]["texts_in"] == expected_texts
    assert manifest["counts"]["predictions_written"] == preds.height
    assert manifest["counts"]["error_rows"] == errors.height
    return manifest


def test_job_on_local_ray_with_two_actors(tmp_path, tiny_model_dir, local_ray):
    from flowray.pipeline.job import run_job

    cfg = JobConfig.from_dict(_config(tmp_path, tiny_model_dir))
    result = run_job(cfg)
    run_dir = tmp_path / "runs" / "t"
    manifest = _check_exactly_once(run_dir, 14)
    assert manifest["counts"]["error_rows"] == 1 and manifest["counts"]["shards"] == 7
    workers = {json.loads(p.read_text())["worker"] for p in (run_dir / "done").iterdir()}
    assert len(workers) == 2, "both actors should have taken shards"
    for name in ("head_activation", "component_importance", "head_roles", "domain_specialisation",
                 "ffn_activation", "pos_importance", "domain_summary", "errors"):
        assert (run_dir / "tables" / f"{name}.parquet").is_file()
    act = pl.read_parquet(run_dir / "tables" / "head_activation.parquet")
    assert set(act["domain"]) == {"notes", "ioi"} and set(act["tau"]) == {0.02, 0.05}
    assert act["frequency"].is_between(0, 1).all()
    for fig in ("figures/activation_map.png", "figures/domain_comparison.png"):  # the report, after the reduce
        assert (run_dir / fig).read_bytes()[:4] == b"\x89PNG"
    assert manifest["shards_verified"] == 7 and manifest["exactly_once"] == {"texts_planned": 14, "texts_found": 14}
    assert "previous-token heads" in (run_dir / "summary.md").read_text()
    assert (run_dir / "report.html").is_file() and "(report.html)" in (run_dir / "summary.md").read_text()
    # re-running the finished run resumes: nothing to do, same outputs
    again = run_job(cfg)
    assert again.manifest["counts"]["shards_resumed"] == 7
    assert again.manifest["counts"]["predictions_written"] == manifest["counts"]["predictions_written"]
    assert result.run_uri.endswith("runs/t")


def _dies_once(shard_id: str, marker: str):
    """A ShardWorker whose process dies hard (as an OOM kill or a lost node would) once: after computing
    ``shard_id`` and before writing any of it; ``marker`` records that it happened. Defined here, so Ray
    ships the class by value to its actors."""
    from flowray.pipeline.worker import ShardWorker

    class DiesOnce(ShardWorker):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            process = self.flow.process

            def process_then_die(docs, *args, **kw):
                out = process(docs, *args, **kw)
                if any(d["shard_id"] == shard_id for d in docs) and not os.path.exists(marker):
                    with open(marker, "w") as fh:
                        fh.write(self.name)
                    os._exit(17)
                return out

            self.flow.process = process_then_die

    return DiesOnce


def test_a_worker_that_dies_mid_shard_loses_nothing(tmp_path, tiny_model_dir, local_ray, monkeypatch):
    from flowray.pipeline import worker
    from flowray.pipeline.job import run_job

    cfg = JobConfig.from_dict(_config(tmp_path, tiny_model_dir, run_name="crash"))
    marker = tmp_path / "crashed"
    # the map stage looks the actor class up when it starts
    monkeypatch.setattr(worker, "ShardWorker", _dies_once("notes-00002", str(marker)))
    run_job(cfg)
    assert marker.is_file(), "the fault was not injected"
    _check_exactly_once(tmp_path / "runs" / "crash", 14)


def test_a_different_config_on_the_same_run_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    from flowray.pipeline import job
    from flowray.pipeline.job import run_job
    from flowray.pipeline.reduce import IncompleteRunError

    monkeypatch.setattr(job, "_map_stage", lambda *a, **k: None)  # the prepared run is what is compared
    with pytest.raises(IncompleteRunError):
        run_job(JobConfig.from_dict(_config(tmp_path, tiny_model_dir, run_name="same", texts_per_domain=2)))
    with pytest.raises(ConfigError, match="different config"):
        run_job(JobConfig.from_dict(_config(tmp_path, tiny_model_dir, run_name="same", texts_per_domain=3)))
    assert (tmp_path / "runs" / "same" / "shards" / "index.json").is_file()  # a refused run removes nothing of the first


def test_bad_corpora_fail_before_any_actor_starts(tmp_path, tiny_model_dir, monkeypatch):
    from flowray.pipeline import job
    from flowray.pipeline.job import run_job

    def no_actors(*_a, **_k):
        raise AssertionError("the map stage (Ray actors) started for a config that cannot run")

    monkeypatch.setattr(job, "_map_stage", no_actors)
    bad_field = _config(tmp_path, tiny_model_dir)
    bad_field["corpora"][0]["source"]["text_field"] = "text"  # the file has "body"
    with pytest.raises(ConfigError, match="'text'"):
        run_job(JobConfig.from_dict(bad_field))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = _config(tmp_path, tiny_model_dir, run_name="empty")
    cfg["corpora"][0]["source"]["paths"] = [str(empty)]
    with pytest.raises(ConfigError, match="yielded no documents"):
        run_job(JobConfig.from_dict(cfg))
    blank = tmp_path / "blank.jsonl"  # every text empty: nothing to compute, stop before the map stage
    blank.write_text('{"body": ""}\n{"body": "   "}\n{"body": null}\n{"body": "\\n\\n"}\n')
    cfg["corpora"][0]["source"]["paths"] = [str(blank)]
    with pytest.raises(ConfigError, match="all 4 texts are empty or only whitespace"):
        run_job(JobConfig.from_dict({**cfg, "run_name": "blank"}))
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"body": "fine"}\n' + bytes(range(128, 256)) + b"\n")
    cfg["corpora"][0]["source"]["paths"] = [str(binary)]
    with pytest.raises(InputError, match=r"binary.jsonl:2: not a JSON object \(not UTF-8 text\).*skip_bad_lines"):
        run_job(JobConfig.from_dict({**cfg, "run_name": "binary"}))
    with pytest.raises(ConfigError, match="cannot write the run directory '/proc/x/t'"):
        run_job(JobConfig.from_dict(_config(tmp_path, tiny_model_dir, output="/proc/x")))
    with pytest.raises(FlowrayError):
        run_job(JobConfig.from_dict(_config(tmp_path, tmp_path / "no-model-here", run_name="nomodel")))
    # none of these runs got to its first shard: no folder is left for a rerun to trip on
    assert not list((tmp_path / "runs").iterdir())


def test_a_jsonl_with_bad_lines_can_skip_them(tmp_path):
    from flowray.corpora import iter_documents, validate_source

    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "one"}\n{"text": \n' + b"\xff\xfe\n" + b'[1, 2]\n{"text": "two"}\n')
    source = validate_source({"kind": "jsonl", "paths": [str(path)], "skip_bad_lines": True})
    docs = list(iter_documents(source))
    assert [d.text for d in docs] == ["one", "two"] and docs[1].doc_id == "mixed.jsonl:000004"
    with pytest.raises(InputError, match="mixed.jsonl:2: not a JSON object"):
        list(iter_documents(validate_source({"kind": "jsonl", "paths": [str(path)]})))


def test_impossible_resources_fail_fast_instead_of_waiting(tmp_path, tiny_model_dir, local_ray, monkeypatch):
    from flowray.pipeline import job
    from flowray.pipeline.job import run_job

    def no_prepare(*_a, **_k):
        raise AssertionError("the corpora were prepared for a pool that cannot start")

    monkeypatch.setattr(job, "prepare", no_prepare)
    t0 = time.time()
    with pytest.raises(ConfigError, match=r"no node of this Ray cluster can run one model actor: each asks for "
                       r"\{CPU: 1, GPU: 1\}.*no autoscaler.*set gpus_per_actor: 0"):
        run_job(JobConfig.from_dict(_config(tmp_path, tiny_model_dir, run_name="gpu", gpus_per_actor=1,
                                            texts_per_domain=2)))
    assert time.time() - t0 < 60
    assert not (tmp_path / "runs" / "gpu").exists()


def test_a_committed_shard_damaged_later_is_redone(tmp_path, tiny_model_dir, local_ray):
    """Truncate a finished run's predictions file, delete another, cut a marker: the next run redoes those."""
    from flowray.pipeline.job import run_job

    cfg = JobConfig.from_dict(_config(tmp_path, tiny_model_dir, run_name="damaged"))
    run_dir = tmp_path / "runs" / "damaged"
    run_job(cfg)
    good = _check_exactly_once(run_dir, 14)
    victim = run_dir / "predictions" / "notes-00001.parquet"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    (run_dir / "predictions" / "notes-00002.parquet").unlink()
    marker = run_dir / "done" / "ioi-00000.json"
    marker.write_text(marker.read_text()[:40])
    again = run_job(cfg)
    manifest = _check_exactly_once(run_dir, 14)
    assert again.manifest["counts"]["shards_resumed"] == 7 - 3
    assert manifest["counts"]["predictions_written"] == good["counts"]["predictions_written"]


def test_driver_stopped_mid_run_then_restarted(tmp_path, tiny_model_dir):
    # 68 one-text shards: enough that the kill lands mid-run however fast the importances get
    cfg = _config(tmp_path, tiny_model_dir, n_notes=64, run_name="stop", texts_per_domain=64, texts_per_shard=1,
                  actors=1)
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "flowray.cli", "job", "run", "--config", str(cfg_path)]
    done_dir = tmp_path / "runs" / "stop" / "done"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240

    def markers():  # committed done markers; a ".tmp-*" file is a marker being written, not a commit
        return [p for p in done_dir.glob("*.json")] if done_dir.is_dir() else []

    while time.time() < deadline and len(markers()) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, mid-run
    proc.wait()
    # a Ray worker outside the driver's process group can commit one more shard before it notices that its
    # raylet is gone (seen once in CI: 5 markers counted, 6 resumed): count once the markers stop changing
    finished_before, settled = len(markers()), time.time()
    while time.time() - settled < 3 and time.time() < deadline + 60:
        time.sleep(0.2)
        now = len(markers())
        if now != finished_before:
            finished_before, settled = now, time.time()
    assert 2 <= finished_before < 68, f"the kill should land mid-run ({finished_before} of 68 shards done)"
    assert not (tmp_path / "runs" / "stop" / "manifest.json").exists()
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    manifest = _check_exactly_once(tmp_path / "runs" / "stop", 68)
    assert manifest["counts"]["shards_resumed"] == finished_before


def test_a_shard_that_cannot_be_written_stops_the_job_with_one_clear_error(tmp_path, tiny_model_dir, local_ray):
    """A write that fails in a worker (here: a directory where its predictions file goes, as a full or
    read-only disk fails) reaches the driver as data and ends the run with the storage error, no Ray traceback."""
    from flowray.pipeline.job import run_job
    from flowray.pipeline.storage import StorageError

    data = _config(tmp_path, tiny_model_dir, run_name="nowrite", texts_per_domain=2, actors=1)
    cfg = JobConfig.from_dict({**data, "corpora": data["corpora"][:1]})
    blocker = tmp_path / "runs" / "nowrite" / "predictions" / "notes-00000.parquet"
    blocker.mkdir(parents=True)
    with pytest.raises(StorageError, match=r"^shard notes-00000: could not write .*/predictions/notes-00000.parquet: "
                       r".*the same command resumes once this is fixed"):
        run_job(cfg)
    run_dir = tmp_path / "runs" / "nowrite"
    assert not [p for p in run_dir.rglob(".tmp-*")], "a temporary file was left behind"
    assert not (run_dir / "done" / "notes-00000.json").exists() and not (run_dir / "manifest.json").exists()
    assert not (run_dir / "lock.json").exists(), "the lease is released"


def test_sigterm_stops_the_driver_like_an_interrupt(tmp_path, tiny_model_dir):
    """``kill`` (or a scheduler) in the map stage: one line and status 143, as Ctrl-C gives 130."""
    cfg = _config(tmp_path, tiny_model_dir, run_name="term", texts_per_domain=8, texts_per_shard=1, actors=1)
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump({**cfg, "corpora": cfg["corpora"][:1]}))
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "flowray.cli", "job", "run", "--config", str(cfg_path)],
                                stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 240
        # Ray is up (its own SIGTERM handler installed) and the dataset runs: the moment the fault showed in
        while time.time() < deadline and "Starting execution of Dataset" not in log.read_text():
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    text = log.read_text()
    assert proc.returncode == 143, text[-3000:]
    assert text.rstrip().splitlines()[-1] == "flowray: terminated (SIGTERM)"
    assert "SIGTERM received" not in text and "Traceback" not in text
    run_dir = tmp_path / "runs" / "term"
    assert not list(run_dir.rglob(".tmp-*")) and not (run_dir / "lock.json").exists()
