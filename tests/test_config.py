"""Job config validation: unknown keys, bad values, bad sources — clear errors before anything runs."""

from __future__ import annotations

import pytest
import yaml

from conftest import REPO, SHARED_DATA
from flowray.config import JobConfig, default_config_path
from flowray.errors import ConfigError

BASE = {"corpora": [{"domain": "prose", "source": {"kind": "pydoc_topics"}}]}


def _cfg(**changes):
    return JobConfig.from_dict({**BASE, **changes})


SHIPPED = sorted((REPO / "flowray" / "configs").glob("*.yaml")) + sorted((REPO / "jobs" / "configs").glob("*.yaml"))


def test_every_shipped_config_is_tested():
    assert [p.stem for p in SHIPPED] == ["default", "shared_data", "cluster_llama2"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_configs_validate(path):
    if path.stem == "shared_data" and not SHARED_DATA.is_dir():
        pytest.skip(f"shared_data reads its corpora from {SHARED_DATA}, which is not present")
    cfg = JobConfig.from_yaml(path)
    assert cfg.corpora and cfg.tau
    if path.stem == "default":
        assert cfg.general == "prose" and cfg.model == "smollm2"
        assert {c.domain for c in cfg.corpora} >= {"prose", "code", "ioi", "ioi_contrastive", "addition"}
    if path.stem == "cluster_llama2":
        assert cfg.gpus_per_actor >= 1 and cfg.output.startswith("s3://")


@pytest.mark.parametrize("changes,message", [
    ({"texts_per_domian": 3}, "unknown key(s) 'texts_per_domian'; allowed keys:"),
    ({"tau": [0.01, 1.5]}, "strictly between 0 and 1; got 1.5"),
    ({"tau": []}, "at least one threshold"),
    ({"tau": [0.01, 0.01]}, "distinct"),
    ({"tau": [0.01, 0.0100000001]}, "0.01 and 0.0100000001 both name the column 'route_heads@0.01'"),
    ({"output": ""}, "output: expected a local folder or a bucket URI (s3://..., gs://...); got ''"),
    ({"output": "  "}, "output: expected a local folder"),
    ({"actors": 0}, "actors: expected a positive integer; got 0"),
    ({"actors": "two"}, "actors: expected an integer; got 'two'"),
    ({"batch_size": True}, "batch_size: expected an integer; got True"),
    ({"dtype": "float64"}, "dtype: expected one of float32, float16, bfloat16; got 'float64'"),
    ({"general_domain": "c4"}, "general_domain: 'c4' is not one of the corpora's domains (prose)"),
    ({"gpus_per_actor": -1}, "gpus_per_actor: expected a non-negative number"),
    ({"min_actors": 5}, "min_actors: expected 1..actors (2); got 5"),
    ({"run_name": "a b"}, "run_name: use letters"),
    ({"corpora": []}, "at least one corpus"),
    ({"corpora": [{"domain": "x", "source": {"kind": "pydoc_topics"}}, {"domain": "x", "source": {"kind": "stdlib_code"}}]},
     "unique; repeated: x"),
    ({"corpora": [{"domain": "x", "sorce": {"kind": "pydoc_topics"}}]}, "corpora[0]: unknown key(s) 'sorce'"),
    ({"corpora": [{"domain": "x", "source": {"kind": "wikipedia"}}]}, "corpora[0].source"),
    ({"device": "bogus"}, "device: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got 'bogus'"),
    ({"device": "cuda:0"}, "needs GPUs, but gpus_per_actor is 0"),
    ({"device": 3}, "device: expected a string; got 3"),
    ({"backend": "gpu"}, "backend: expected one of auto, cpu, torch, triton; got 'gpu'"),
    ({"backend": "triton"}, "backend: 'triton' runs on NVIDIA GPUs, but no actor would have one"),
    ({"backend": "cpu", "gpus_per_actor": 1}, "backend: 'cpu' needs the model on the CPU, but the actors get GPUs"),
    ({"run_name": 5}, "run_name: expected a string; got 5"),
    ({"model": ["a"]}, "model: expected a string; got ['a']"),
    ({"dtype": ["float32"]}, "dtype: expected one of"),
    ({"general_domain": 7}, "general_domain: expected a string; got 7"),
    ({"prepend_bos": "maybe"}, "prepend_bos: expected true/false; got 'maybe'"),
    ({"cpus_per_actor": float("nan")}, "cpus_per_actor: expected a finite number; got nan"),
    ({"gpus_per_actor": float("inf")}, "gpus_per_actor: expected a finite number; got inf"),
    ({"corpora": [{"domain": "x", "source": {"kind": "jsonl", "paths": ["/nonexistent/file.jsonl"], "text_field": "text"}}]},
     "/nonexistent/file.jsonl"),
])
def test_bad_configs_are_rejected_with_what_and_how(changes, message):
    with pytest.raises(ConfigError) as exc:
        _cfg(**changes)
    assert message in str(exc.value)


def test_yaml_overrides_and_missing_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**BASE, "texts_per_domain": 5}))
    cfg = JobConfig.from_yaml(path, overrides=["texts_per_domain=7", "tau=[0.02]"])
    assert cfg.texts_per_domain == 7 and cfg.tau == (0.02,)
    with pytest.raises(ConfigError, match="expected key=value"):
        JobConfig.from_yaml(path, overrides=["texts_per_domain"])
    with pytest.raises(ConfigError, match="does not exist"):
        JobConfig.from_yaml(tmp_path / "nope.yaml")
    path.write_text("corpora: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        JobConfig.from_yaml(path)
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(ConfigError, match=r"override 'tau=\[0.1': the value '\[0.1' is not valid YAML"):
        JobConfig.from_yaml(path, overrides=["tau=[0.1"])
    with pytest.raises(ConfigError, match="is not valid YAML"):
        JobConfig.from_yaml(path, overrides=["corpora={a: [}"])
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="is not UTF-8 text .*binary file"):
        JobConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="is a directory; expected a file"):
        JobConfig.from_yaml(tmp_path)


def test_exponent_floats_are_numbers_in_files_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(BASE) + "tau: [1e-3, 2.5E-2]\n")
    assert JobConfig.from_yaml(path).tau == (0.001, 0.025)
    assert JobConfig.from_yaml(path, overrides=["tau=[1e-9]"]).tau == (1e-9,)
    assert JobConfig.from_yaml(path, overrides=["run_name=1e3x"]).run_name == "1e3x"  # not a number: a string


def test_a_cuda_device_with_gpus_validates():
    cfg = _cfg(device="cuda", gpus_per_actor=1)
    assert cfg.device == "cuda"
    assert _cfg().backend == "auto" and _cfg(backend="triton", gpus_per_actor=1).backend == "triton"
    assert _cfg(backend="cpu", gpus_per_actor=1, device="cpu").backend == "cpu"


def test_relative_corpus_paths_resolve_against_the_config(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "hello"}\n')
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"corpora": [{"domain": "a", "source": {
        "kind": "jsonl", "paths": ["data/a.jsonl"], "text_field": "text"}}]}))
    cfg = JobConfig.from_yaml(path)
    assert cfg.corpora[0].source["paths"] == [str(tmp_path / "data" / "a.jsonl")]


def test_content_hash_ignores_resources_but_not_science():
    a = _cfg()
    assert a.content_hash() == _cfg(actors=7, gpus_per_actor=1, batch_size=9, output="s3://b/x").content_hash()
    assert a.content_hash() == _cfg(backend="torch").content_hash()  # every backend computes the same numbers
    assert a.content_hash() != _cfg(tau=[0.02]).content_hash()
    assert a.content_hash() != _cfg(max_tokens=17).content_hash()
    assert a.content_hash() != _cfg(prepend_bos=False).content_hash()


def test_the_shared_data_config_without_its_folder_says_what_to_run_instead(tmp_path, monkeypatch, capsys):
    """`make analysis` on a machine without the shared data: one line naming the folder and the own-corpus route."""
    from flowray.cli import main

    monkeypatch.setenv("FLOWRAY_SHARED_DATA", str(tmp_path / "nothing-here"))
    assert main(["job", "run", "--config", "shared_data"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "found no shared/data folder" in err, err
    assert "FLOWRAY_SHARED_DATA=" in err and "flowray job run --config my.yaml" in err
    assert "python analysis/run_all.py --run runs/<run_name>" in err
