"""Security defaults, checked: the embedded Ray listens for no dashboard and keeps token authentication on;
custom model code runs only when asked for; no pickle is ever loaded from a run directory, a corpus or a
model path (the code is scanned, and a model directory holding a booby-trapped pickle is loaded).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

from flowray.config import JobConfig

SOURCES = [p for folder in ("flowray", "analysis", "jobs", "scripts", "bench") for p in (REPO / folder).rglob("*.py")]


# --- Ray ------------------------------------------------------------------------------------------
def test_embedded_ray_has_no_dashboard_and_a_cluster_address_is_joined_as_is(monkeypatch):
    from flowray.pipeline.job import ray_init_kwargs

    cfg = JobConfig.from_dict({"corpora": [{"domain": "prose", "source": {"kind": "pydoc_topics"}}]})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    kwargs = ray_init_kwargs(cfg, {})
    assert kwargs["include_dashboard"] is False
    assert "dashboard_host" not in kwargs or kwargs["dashboard_host"] == "127.0.0.1"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert ray_init_kwargs(cfg, {}) == {}  # a cluster's own settings (its dashboard, its auth) are not changed


@pytest.mark.slow
def test_embedded_ray_starts_with_token_auth_and_no_dashboard_quietly(tmp_path):
    script = textwrap.dedent("""
        import json, logging, os
        os.environ.pop("RAY_ADDRESS", None); os.environ.pop("RAY_AUTH_MODE", None)
        logging.basicConfig(level=logging.INFO)
        import ray
        from ray._raylet import AuthenticationMode, get_authentication_mode
        from flowray.config import JobConfig
        from flowray.pipeline.job import quiet_ray_notices, ray_init_kwargs
        cfg = JobConfig.from_dict({"actors": 1, "corpora": [{"domain": "p", "source": {"kind": "pydoc_topics"}}]})
        quiet_ray_notices()
        ctx = ray.init(**ray_init_kwargs(cfg, {}))
        print(json.dumps({"token": get_authentication_mode() == AuthenticationMode.TOKEN,
                          "dashboard_url": ctx.dashboard_url or "", "env": os.environ.get("RAY_AUTH_MODE")}))
        ray.shutdown()
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["token"] and facts["env"] == "token", facts  # Ray 2.60's local default, kept
    assert facts["dashboard_url"] == "", facts
    assert "Token authentication is enabled" not in proc.stderr  # the notice is dropped, not the setting


# --- custom code ------------------------------------------------------------------------------------
def test_trust_remote_code_is_off_everywhere_unless_asked():
    from flowray.cli import build_parser
    from flowray.models.loading import load_model, load_tokenizer

    assert JobConfig.from_dict({"corpora": [{"domain": "p", "source": {"kind": "pydoc_topics"}}]}).trust_remote_code is False
    for fn in (load_model, load_tokenizer):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False
    for action in build_parser()._actions:  # every subcommand that has the flag: store_true, default False
        for sub in getattr(action, "choices", None) or {}:
            parser = action.choices[sub]
            if hasattr(parser, "_actions"):
                flags = [a for a in parser._actions if "--trust-remote-code" in a.option_strings]
                assert all(a.default is False for a in flags), sub
    hits = [f"{p.relative_to(REPO)}:{n}" for p in SOURCES for n, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"trust_remote_code\s*=\s*True", line)]
    assert not hits, f"trust_remote_code=True hard-coded at {hits}"


def test_a_model_directory_with_custom_code_is_refused_without_running_it(tmp_path):
    from flowray.errors import FlowrayError
    from flowray.models.loading import load_model

    marker = tmp_path / "custom-code-ran"
    model = tmp_path / "custom"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}}))
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises((FlowrayError, ValueError, OSError)):
        load_model(str(model), device="cpu")
    assert not marker.exists(), "the model directory's Python code was executed"


# --- pickle -----------------------------------------------------------------------------------------
PICKLE_LOADERS = [
    (r"\bpickle\.loads?\(", "pickle.load"),
    (r"\bcloudpickle\.loads?\(", "cloudpickle.load"),
    (r"\bdill\.loads?\(", "dill.load"),
    (r"\bjoblib\.load\(", "joblib.load"),
    (r"\bread_pickle\(", "pandas.read_pickle"),
    (r"\bshelve\.open\(", "shelve"),
    (r"allow_pickle\s*=\s*True", "np.load(allow_pickle=True)"),
]


def test_no_pickle_loader_in_the_code():
    hits = []
    for path in SOURCES:
        text = path.read_text()
        for n, line in enumerate(text.splitlines(), 1):
            for pattern, what in PICKLE_LOADERS:
                if re.search(pattern, line):
                    hits.append(f"{path.relative_to(REPO)}:{n}: {what}")
            if re.search(r"\btorch\.load\(", line) and "weights_only=True" not in line:
                hits.append(f"{path.relative_to(REPO)}:{n}: torch.load without weights_only=True")
            if re.search(r"\bnp\.load\(", line) and "allow_pickle=False" not in line:
                hits.append(f"{path.relative_to(REPO)}:{n}: np.load without allow_pickle=False")
    assert not hits, "pickle can run code when loaded: " + "; ".join(hits)


def test_a_pickled_checkpoint_in_a_model_directory_runs_no_code(tmp_path, tiny_model_dir):
    """transformers reads a ``pytorch_model.bin`` with ``torch.load(weights_only=True)``: the payload stays inert."""
    import pickle
    import shutil

    marker = tmp_path / "pickle-payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    model = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, model)
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    with open(model / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.embed_tokens.weight": Payload()}, fh)
    from flowray.models.loading import load_model

    with pytest.raises(Exception):  # noqa: B017 - whatever refuses it, the payload must not run
        load_model(str(model), device="cpu")
    assert not marker.exists(), "a pickle from a model directory was unpickled with code execution"
    with open(model / "pytorch_model.bin", "rb") as fh:  # control: the trap is armed for a plain unpickler
        pickle.load(fh)
    assert marker.exists()
