"""Faults end in one clear error: a full or read-only disk, an unreachable cluster, broken weights, a model
on the meta device. None of these tests starts Ray."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from flowray.config import JobConfig
from flowray.errors import ConfigError, InputError, UnknownModelError


def _unshare_works() -> bool:
    """A user + mount namespace, where a tiny tmpfs can be mounted without privileges."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -Urm` (unprivileged user and mount namespaces) "
                    "to mount a tiny tmpfs; this machine does not allow it")
@pytest.mark.parametrize("mode, message", [
    ("size=64k", "no space left on the device (disk full)"),
    ("size=64k,ro", "the file system is read-only"),
])
def test_a_full_or_read_only_disk_is_one_clear_error_and_leaves_no_temporary_file(tmp_path, mode, message):
    mount = tmp_path / "disk"
    mount.mkdir()
    script = textwrap.dedent(f"""
        import os
        from flowray.pipeline.storage import Storage, StorageError
        try:
            Storage({str(mount / 'run')!r}).write_bytes("predictions/s-00000.parquet", b"x" * 200_000)
        except StorageError as exc:
            print("ERROR", exc)
        print("LEFT", sorted(os.path.relpath(os.path.join(d, f), {str(mount)!r})
                             for d, _, fs in os.walk({str(mount)!r}) for f in fs))
    """)
    (tmp_path / "write.py").write_text(script)
    cmd = f"mount -t tmpfs -o {mode} tmpfs {mount} && exec {sys.executable} {tmp_path / 'write.py'}"
    proc = subprocess.run(["unshare", "-Urm", "sh", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"could not write {mount}/run/predictions/s-00000.parquet: {message}" in proc.stdout
    assert "LEFT []" in proc.stdout, "a temporary file was left behind"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_an_unreachable_cluster_is_refused_after_the_connect_timeout(tmp_path, monkeypatch):
    from flowray.pipeline.job import _connect

    port = _closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    config = JobConfig.from_dict({"corpora": [{"domain": "d", "source": {"kind": "pydoc_topics"}}],
                                  "ray_connect_timeout_s": 1})
    t0 = time.time()
    with pytest.raises(ConfigError, match=rf"RAY_ADDRESS='127.0.0.1:{port}': no Ray cluster answers there .*waited "
                       r"1 s.*unset RAY_ADDRESS.*ray_connect_timeout_s"):
        _connect(config, {})
    assert time.time() - t0 < 10
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1")
    with pytest.raises(ConfigError, match="is not a cluster address; expected host:port"):
        _connect(config, {})


def test_missing_or_truncated_weights_are_found_before_any_actor(tiny_model_dir, tmp_path, monkeypatch):
    from flowray.models.weights import check_weights
    from flowray.pipeline import job

    check_weights(str(tiny_model_dir))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UnknownModelError, match=r"model.safetensors is [\d,]+ bytes but its header describes "
                       r"[\d,]+ \(truncated\); copy or download the model again"):
        check_weights(str(broken))
    weights.unlink()  # a tokenizer and a config, no weights
    with pytest.raises(UnknownModelError, match="it holds no weights"):
        check_weights(str(broken))

    def no_actors(*_a, **_k):
        raise AssertionError("the map stage (Ray actors) started for a model that cannot load")

    monkeypatch.setattr(job, "_map_stage", no_actors)
    config = JobConfig.from_dict({"corpora": [{"domain": "d", "source": {"kind": "pydoc_topics"}}],
                                  "model": str(broken), "output": str(tmp_path / "runs"), "texts_per_domain": 2})
    with pytest.raises(UnknownModelError, match="holds no weights"):
        job.run_job(config)
    assert not (tmp_path / "runs" / "default" / "lock.json").exists(), "the lease is released on failure"


def test_a_model_on_the_meta_device_is_an_input_error():
    import torch
    import transformers as tf

    import flowray
    from flowray.stats import prediction_stats

    cfg = tf.LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                         hidden_size=8, intermediate_size=8, vocab_size=20)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg)
    ids = torch.tensor([[1, 2, 3]])
    for call in (lambda: flowray.edge_importances(model, ids), lambda: prediction_stats(model, ids, (0.1,))):
        with pytest.raises(InputError, match="the model's weights are on the meta device"):
            call()
