"""The CLI: the demo path on the packaged model, and a clear message + exit status 2 for each bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import numpy as np
import pytest

from conftest import IOI_PROMPT
from flowray.cli import main
from flowray.routes import ROUTE_JSON_SCHEMA


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_route_demo_writes_json_and_figures(tmp_path, capsys, smollm2):
    out, png = tmp_path / "route.json", tmp_path / "route.png"
    code, stdout, _ = _run(["route", "--model", "smollm2", "--text", IOI_PROMPT, "--tau", "0.04",
                            "--out", str(out), "--plot", str(png)], capsys)
    assert code == 0
    assert "predicts ' Mary'" in stdout
    data = json.loads(out.read_text())
    jsonschema.Draft7Validator(ROUTE_JSON_SCHEMA).validate(data)
    assert data["prediction"]["token"] == " Mary"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


@pytest.mark.slow
def test_several_texts_from_a_file(tmp_path, capsys, tiny_model_dir):
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "one two three"}) + "\n\n" + json.dumps({"text": "four five"}) + "\n")
    code, stdout, _ = _run(["route", "--model", str(tiny_model_dir), "--file", str(texts), "--out",
                            str(tmp_path / "routes"), "--plot", str(tmp_path / "figs"), "--plot-format", "svg"], capsys)
    assert code == 0 and "2 routes" in stdout
    assert sorted(p.name for p in (tmp_path / "routes").iterdir()) == ["00000.json", "00001.json"]
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["00000.svg", "00001.svg"]
    code, _, _ = _run(["importances", "--model", str(tiny_model_dir), "--file", str(texts), "--out",
                       str(tmp_path / "imps")], capsys)
    assert code == 0
    with np.load(tmp_path / "imps" / "00001.npz") as z:
        assert set(z.files) >= {"attn", "attn_residual", "ffn", "ffn_residual", "token_ids", "tokens", "meta"}
        assert z["attn"].shape[0] == 2 and z["attn"].shape[2] == z["token_ids"].shape[0]
        cpu_attn = z["attn"]
    code, _, _ = _run(["importances", "--model", str(tiny_model_dir), "--file", str(texts), "--out",
                       str(tmp_path / "imps_torch"), "--backend", "torch"], capsys)
    assert code == 0
    with np.load(tmp_path / "imps_torch" / "00001.npz") as z:
        np.testing.assert_allclose(z["attn"], cpu_attn, atol=1e-5)  # the two kernels agree


BAD_INPUTS = [
    (["route", "--text", "   ", "--out", "x.json"], "empty or only whitespace"),
    (["route", "--text", "hi", "--tau", "0", "--out", "x.json"], "strictly between 0 and 1"),
    (["route", "--text", "hi", "--tau", "1.5", "--out", "x.json"], "strictly between 0 and 1"),
    (["route", "--text", "hi", "--tau", "abc", "--out", "x.json"], "tau must be a number"),
    (["route", "--file", "does/not/exist.txt", "--out", "x"], "does not exist"),
    (["route", "--model", "no such model!", "--text", "hi", "--out", "x.json"], "unknown model 'no such model!'"),
    (["route", "--model", "./missing-dir/model.gguf", "--text", "hi", "--out", "x.json"], "does not exist"),
    (["importances", "--text", "hi", "--out", "x.txt"], "must end in .npz"),
    (["route", "--text", "hi", "--out", "x.json", "--plot", "x.jpg"], ".png or .svg"),
    (["route", "--text", "hi", "--max-tokens", "0", "--out", "x.json"], "positive integer"),
    (["importances", "--text", "hi", "--out", "x.npz", "--backend", "gpu"], "invalid choice: 'gpu'"),
    # outputs checked before the model load (a model that does not exist would fail later: it is not reached)
    (["route", "--model", "none/such", "--text", "hi", "--out", "/proc/x.json"], "--out: cannot write into '/proc'"),
    (["importances", "--model", "none/such", "--text", "hi", "--out", "/proc/x.npz"], "cannot write into '/proc'"),
    (["route", "--model", "none/such", "--text", "hi", "--out", "adir"], "'adir' is an existing directory"),
    (["importances", "--model", "none/such", "--text", "hi", "--out", "adir.npz"], "is an existing directory"),
    (["route", "--model", "none/such", "--file", "t.txt", "--out", "afile.json"], "is an existing file; with --file"),
    (["importances", "--model", "none/such", "--file", "t.txt", "--out", "afile.json"], "is an existing file"),
    (["route", "--model", "none/such", "--text", "hi", "--out", "x.json", "--plot", "/proc/p.png"],
     "--plot: cannot write into '/proc'"),
    # input files: binary, a directory
    (["route", "--model", "none/such", "--file", "binary.txt", "--out", "o"], "is not UTF-8 text (byte 2, line 1"),
    (["route", "--model", "none/such", "--file", "binary.jsonl", "--out", "o"], "is not UTF-8 text"),
    (["importances", "--model", "none/such", "--file", "nul.txt", "--out", "o"], "holds NUL bytes (line 2)"),
    (["route", "--model", "none/such", "--file", "adir", "--out", "o"], "'adir' is a directory; expected a file"),
]


@pytest.fixture
def input_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir.npz").mkdir()
    (tmp_path / "afile.json").write_text("{}")
    (tmp_path / "t.txt").write_text("one text\n")
    (tmp_path / "binary.txt").write_bytes(b"ok\xff\xfe\x00\x81 binary")
    (tmp_path / "binary.jsonl").write_bytes(bytes(range(256)))
    (tmp_path / "nul.txt").write_bytes(b"fine\nnot\x00fine\n")
    return tmp_path


def _exit_code(argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse rejects some values itself (also with status 2)
        return exc.code


@pytest.mark.parametrize("argv,message", BAD_INPUTS)
def test_bad_input_exits_2_with_a_clear_message(argv, message, capsys, input_files):
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert "could not load model" not in err, "the output/input check must come before the model load"


def test_a_kernel_the_device_cannot_run_fails_before_the_model_load(capsys, input_files, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _exit_code(["route", "--model", "none/such", "--text", "hi", "--out", "r.json", "--device", "cpu",
                       "--backend", "triton"]) == 2
    err = capsys.readouterr().err
    assert "backend 'triton' needs a CUDA device; got device 'cpu'" in err and "Traceback" not in err
    assert "could not load model" not in err


def test_outputs_in_missing_folders_are_created_before_the_model_load(capsys, input_files):
    assert _exit_code(["route", "--model", "none/such", "--text", "hi", "--out", "new/deeper/r.json",
                       "--plot", "figs/r.png"]) == 2  # the model fails, after the folders were checked
    assert (input_files / "new" / "deeper").is_dir() and (input_files / "figs").is_dir()
    assert not list((input_files / "new" / "deeper").iterdir()), "the write check leaves nothing behind"


@pytest.mark.slow
def test_a_bad_text_in_a_file_is_recorded_and_the_others_go_on(tmp_path, capsys, tiny_model_dir):
    texts = tmp_path / "texts.txt"
    texts.write_text("one two three four\nhi\nfive six seven eight\n")  # "hi" is too short for --position 3
    out = tmp_path / "routes"
    code, stdout, err = _run(["route", "--model", str(tiny_model_dir), "--file", str(texts), "--out", str(out),
                              "--position", "3"], capsys)
    assert code == 1, "some texts failed: a non-zero status"
    assert sorted(p.name for p in out.iterdir()) == ["00000.json", "00001.error.json", "00002.json"]
    record = json.loads((out / "00001.error.json").read_text())
    assert record["text"] == "hi" and record["error_type"] == "InputError" and "out of range" in record["error"]
    assert "2 routes in" in stdout and "1 of 3 texts failed" in err
    texts.write_text("one two three four\nnine ten eleven twelve\n")  # fixed: the stale record goes
    code, _, _ = _run(["route", "--model", str(tiny_model_dir), "--file", str(texts), "--out", str(out),
                       "--position", "3"], capsys)
    assert code == 0 and not (out / "00001.error.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("extra,message", [
    (["--position", "40"], "position 40 is out of range for 5 tokens"),  # 4 words + the BOS
    (["--position", "-6"], "out of range"),
])
def test_bad_position(extra, message, capsys, tmp_path, tiny_model_dir):
    argv = ["route", "--model", str(tiny_model_dir), "--text", "one two three four", "--out",
            str(tmp_path / "r.json"), *extra]
    assert _exit_code(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_text_longer_than_the_context_offers_max_tokens(capsys, tmp_path, tiny_model_dir):
    long_text = " ".join(["word"] * 40)
    argv = ["route", "--model", str(tiny_model_dir), "--text", long_text, "--out", str(tmp_path / "r.json")]
    assert _exit_code(argv) == 2
    assert "longer than the model's context of 24 tokens; pass --max-tokens 23" in capsys.readouterr().err
    assert _exit_code(argv + ["--max-tokens", "23"]) == 0
    assert len(json.loads((tmp_path / "r.json").read_text())["tokens"]) == 24  # the BOS and 23 text tokens


def test_no_traceback_at_process_level(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flowray.cli", "route", "--text", " ", "--out", "x.json"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("flowray: error: text is empty")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv,message", [
    (["route", "--text", "hi", "--tau", "2", "--out", "x.json"], "argument --tau: tau must be a number strictly between 0 and 1"),
    (["route", "--text", "hi", "--tau", "0", "--out", "x.json"], "strictly between 0 and 1; got 0.0"),
    (["explore", "--text", "hi", "--tau", "1.5", "--out", "x.html"], "strictly between 0 and 1; got 1.5"),
    (["route", "--text", "hi"], "the following arguments are required: --out"),
    (["job", "run", "--set"], "argument --set: expected one argument"),
    ([], "the following arguments are required: command"),
])
def test_argument_errors_are_one_line_without_the_usage_block(argv, message, capsys):
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert "usage:" not in err and "--help" in err  # the way to the full usage, not the usage itself


def test_the_demo_ends_by_naming_the_report_page():
    """`make demo` runs the job last, and the job's closing lines name report.html, the page to open."""
    import re
    from pathlib import Path

    from flowray.pipeline.cli import run_listing

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    recipe = re.search(r"^demo: setup\n((?:\t.*\n)+)", makefile, re.M).group(1)
    commands = [c for c in recipe.replace("\\\n", " ").splitlines() if c.strip()]
    assert "flowray job run" in commands[-1], commands
    manifest = {"run_name": "default", "elapsed_s": 9.0, "figures": ["figures/activation_map.png"],
                "counts": {"texts_in": 2, "predictions_written": 30, "error_rows": 0}}
    lines = run_listing("runs/default", manifest).splitlines()
    assert "runs/default/report.html" in lines[-1]
    assert any(line.endswith("runs/default/summary.md") for line in lines)
