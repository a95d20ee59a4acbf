"""Property-based: any job config value, any `--set`, any CLI option either validates or gives a named
FlowrayError / exit status 2 — never a traceback or a hang. Validate-only paths: no model is loaded."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowray import cli
from flowray.config import JobConfig
from flowray.errors import FlowrayError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # capsys is read per example
BASE = {"corpora": [{"domain": "prose", "source": {"kind": "pydoc_topics"}}]}
KEYS = sorted(f.name for f in dataclasses.fields(JobConfig)) + ["texts_per_domian", "corpus", ""]

scalars = st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True) | st.text(max_size=12)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
# values shaped like the real ones, so that validation gets past the first type check more often
plausible = st.one_of(
    st.lists(st.floats(-1, 2), max_size=3), st.integers(-2, 5), st.floats(-1, 3), st.sampled_from(
        ["auto", "cpu", "cuda", "cuda:1", "mps", "float16", "float64", "prose", "a b", "/proc/x", "s3://b/x"]),
    st.lists(st.fixed_dictionaries({"domain": st.sampled_from(["x", "prose", "a b"]), "source": values}), max_size=2),
)


def _validates_or_refuses(data) -> None:
    try:
        JobConfig.from_dict(data)
    except FlowrayError:
        pass  # a named error: what was wrong, what was expected


@SETTINGS
@given(key=st.sampled_from(KEYS), value=values | plausible)
def test_any_job_config_value_validates_or_is_refused(key, value):
    _validates_or_refuses({**BASE, key: value})


@SETTINGS
@given(source=st.dictionaries(st.sampled_from(["kind", "paths", "text_field", "mode", "task", "n", "max_chars",
                                               "skip_bad_lines", "variant", "path", "split"]),
                              values | st.sampled_from(["jsonl", "text", "task", "ioi", "hf", "lines"]), max_size=4),
       extra=st.dictionaries(st.sampled_from(["language", "texts", "domian"]), values, max_size=2))
def test_any_corpus_source_validates_or_is_refused(source, extra):
    _validates_or_refuses({"corpora": [{"domain": "x", "source": source, **extra}]})


def _exit_status(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse's own refusals
        return exc.code


@contextlib.contextmanager
def _in_empty_folder():
    old = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        try:
            yield Path(folder)
        finally:
            os.chdir(old)


@pytest.fixture(scope="module")
def job_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "job.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


@SETTINGS
@given(key=st.sampled_from(KEYS), raw=st.text(max_size=20) | st.sampled_from(
    ["[0.1", "{a: [}", "!!python/object:os.system", "2001-01-01", ".nan", "-.inf", "'", "[0.01, 0.04]"]))
def test_any_set_override_validates_or_exits_2(job_yaml, capsys, key, raw):
    status = _exit_status(["job", "validate", "--config", str(job_yaml), "--set", f"{key}={raw}"])
    err = capsys.readouterr().err
    assert status in (0, 2) and "Traceback" not in err


class _Reached(Exception):
    """The model load: every check before it passed."""


_names = st.text(alphabet="abcxyz019._-/", min_size=1, max_size=12).filter(lambda s: ".." not in s
                                                                           and not s.startswith("/"))
_option_values = {
    "--tau": st.text(max_size=8) | st.floats().map(str),
    "--position": st.text(max_size=6) | st.integers(-10**6, 10**6).map(str),
    "--max-tokens": st.text(max_size=6) | st.integers(-5, 10**9).map(str),
    "--chunk-size": st.text(max_size=6) | st.integers(-5, 10**9).map(str),
    "--backend": st.sampled_from(["auto", "cpu", "torch", "gpu", ""]),
    "--dtype": st.sampled_from(["float32", "bfloat16", "float64", ""]),
    "--plot": _names | st.sampled_from(["/proc/p.png", "x.jpg", "f.png"]),
    "--plot-format": st.sampled_from(["png", "svg", "pdf"]),
}


@SETTINGS
@given(command=st.sampled_from(["route", "importances"]),
       text=st.text(max_size=10) | st.none(),
       out=_names | st.sampled_from(["/proc/x.json", ".", "afile", "adir", "r.npz", "o.json"]),
       options=st.dictionaries(st.sampled_from(sorted(_option_values)), st.just(None), max_size=3), data=st.data())
def test_any_cli_options_exit_2_or_reach_the_model_load(monkeypatch, capsys, command, text, out, options, data):
    monkeypatch.setattr(cli, "load_model_from_args", lambda args: (_ for _ in ()).throw(_Reached()))
    with _in_empty_folder() as folder:
        (folder / "afile").write_text("one text\n")
        (folder / "adir").mkdir()
        argv = [command, "--model", "none/such", "--out", out]
        argv += ["--text", text] if text is not None else ["--file", "afile"]
        for option in options:
            if command == "importances" and option in ("--plot", "--plot-format", "--tau", "--position"):
                continue
            argv += [option, data.draw(_option_values[option])]
        try:
            status = _exit_status(argv)
        except _Reached:
            status = "model load"
    err = capsys.readouterr().err
    assert status in (2, "model load"), (argv, status, err)
    assert "Traceback" not in err
