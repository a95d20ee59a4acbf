"""`flowray explore` and `flowray.explore`: pages from a model directory, and the route command's errors."""

from __future__ import annotations

import json
import re

import pytest

from explore_helpers import ABC, IOI, save_tiny, tiny_loaded
from flowray.cli import main
from test_cli import BAD_INPUTS


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-explore"))


def _data(path):
    html = path.read_text()
    return json.loads(re.search(r'id="flowray-data">(.*?)</script>', html, re.S).group(1))


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own rejections (status 2 too)
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_explore_writes_one_self_contained_page(tmp_path, capsys, tiny_dir):
    out = tmp_path / "route.html"
    code, stdout, _ = _run(["explore", "--model", str(tiny_dir), "--text", IOI, "--tau", "0.02", "--out", str(out)],
                           capsys)
    assert code == 0 and f"explorer: {out}" in stdout
    data = _data(out)
    assert data["mode"] == "single" and data["tau"] == 0.02 and len(data["prompts"]) == 1
    assert data["prompts"][0]["n_layers"] == 3 and "<script src" not in out.read_text()


def test_several_texts_share_one_page_and_two_can_be_compared(tmp_path, capsys, tiny_dir):
    texts = tmp_path / "texts.txt"
    texts.write_text(f"{IOI}\n\n{ABC}\nthe cat sat on the mat\n")
    code, stdout, _ = _run(["explore", "--model", str(tiny_dir), "--file", str(texts), "--out", str(tmp_path / "m.html")],
                           capsys)
    assert code == 0 and [p["text"] for p in _data(tmp_path / "m.html")["prompts"]] == [IOI, ABC, "the cat sat on the mat"]
    said = re.findall(r"^text (\d): position (\d+) \(.*\) predicts .* \(p = 0\.\d{3}\)$", stdout, re.M)
    assert [int(i) for i, _ in said] == [0, 1, 2], stdout  # every text's prediction, not only the first
    assert [int(p) for _, p in said] == [p["position"] for p in _data(tmp_path / "m.html")["prompts"]]
    code, _, _ = _run(["explore", "--model", str(tiny_dir), "--text", IOI, "--compare", ABC, "--position", "-2",
                       "--out", str(tmp_path / "c.html")], capsys)
    data = _data(tmp_path / "c.html")
    assert code == 0 and data["mode"] == "compare" and [p["position"] for p in data["prompts"]] == [13, 13]  # BOS + 14 words


def _error_line(err: str) -> str:
    line = err.strip().splitlines()[-1]
    message = line.split("error: ", 1)[1]  # argparse names the subcommand ("flowray route: error: ...")
    return re.sub(r"; see 'flowray \w+ --help'$", "", message)  # ... and points at its own --help


# (with --file, route writes a directory of routes and explore one page: an existing file is an error only
# for route, so that case is not shared)
ROUTE_BAD = [argv for argv, _ in BAD_INPUTS if argv[0] == "route" and "--plot" not in argv and "afile.json" not in argv]


@pytest.mark.parametrize("argv", ROUTE_BAD, ids=[" ".join(a[1:3]) for a in ROUTE_BAD])
def test_bad_input_gets_the_route_commands_errors(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()  # the files test_cli's bad inputs refer to
    (tmp_path / "afile.json").write_text("{}")
    (tmp_path / "t.txt").write_text("one text\n")
    (tmp_path / "binary.txt").write_bytes(b"ok\xff\xfe\x00\x81 binary")
    code_r, _, err_r = _run(argv, capsys)
    explore = ["explore"] + ["x.html" if a == "x.json" else a for a in argv[1:]]
    code_e, _, err_e = _run(explore, capsys)
    assert code_e == code_r == 2
    assert _error_line(err_e) == _error_line(err_r) and "Traceback" not in err_e


@pytest.mark.parametrize("extra", [["--position", "40"], ["--position", "-20"]])
def test_bad_position_as_route_says_it(extra, capsys, tmp_path, tiny_dir):
    args = ["--model", str(tiny_dir), "--text", "one two three four", *extra]
    code_r, _, err_r = _run(["route", *args, "--out", str(tmp_path / "r.json")], capsys)
    code_e, _, err_e = _run(["explore", *args, "--out", str(tmp_path / "r.html")], capsys)
    assert code_r == code_e == 2 and _error_line(err_e) == _error_line(err_r)
    assert "out of range for 5 tokens" in err_e  # 4 words + the BOS


@pytest.mark.parametrize("argv,message", [
    (["explore", "--text", "hi", "--out", "x.json"], "--out must end in .html"),
    (["explore", "--file", "t.txt", "--compare", "hi", "--out", "x.html"], "cannot be used with --file"),
    (["explore", "--text", "hi", "--compare", " ", "--out", "x.html"], "text is empty or only whitespace; got ' '"),
])
def test_explore_specific_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("a text\n")
    code, _, err = _run(argv, capsys)
    assert code == 2 and message in err


def test_python_api(tmp_path):
    import flowray
    from flowray.errors import InputError

    lm = tiny_loaded("gpt2")
    path = flowray.explore(lm, IOI, tmp_path / "g.html", compare=ABC, tau=0.05)
    assert _data(path)["mode"] == "compare"
    path = flowray.explore(lm.model, [IOI, ABC], tmp_path / "h.html", tokenizer=lm.tokenizer, position=3)
    assert [p["position"] for p in _data(path)["prompts"]] == [3, 3]
    with pytest.raises(InputError, match="one text and compare"):
        flowray.explore(lm, [IOI, ABC], tmp_path / "x.html", compare=ABC)
    with pytest.raises(InputError, match="needs a tokenizer"):
        flowray.explore(lm.model, IOI, tmp_path / "x.html")
    with pytest.raises(InputError, match="tau must be"):
        flowray.explore(lm, IOI, tmp_path / "x.html", tau=1.5)


def test_a_page_too_big_for_a_browser_is_refused_before_the_model_runs(tmp_path, capsys, tiny_dir, monkeypatch):
    import flowray
    import flowray.explorer.build as build
    from flowray.explorer.size import MAX_PAGE_MB, page_bytes

    assert f"default {MAX_PAGE_MB} MB" in _run(["explore", "--help"], capsys)[1]  # the limit, in --help
    lm = tiny_loaded()
    s = lm.adapter.shape
    text = " ".join(["the cat sat on the mat"] * 10)  # 60 tokens + the BOS
    limit_mb = page_bytes(s.n_layers, s.n_heads, s.parallel, [41], 5) / 1e6  # 40 text tokens fit, no more
    real_view = build.prompt_view

    def no_model(*_a, **_k):
        raise AssertionError("the model ran for a page that is refused")

    monkeypatch.setattr(build, "prompt_view", no_model)
    with pytest.raises(flowray.errors.InputError, match=r"the explorer page would be about [\d.]+ MB \(\d+ layers x \d+ "
                       r"heads, 61 tokens: it grows as tokens\^2\), more than the [\d.]+ MB limit a browser opens "
                       r"reliably; pass --max-tokens 40 \(or less\)"):
        flowray.explore(lm, text, tmp_path / "big.html", max_page_mb=limit_mb)
    code, _, err = _run(["explore", "--model", str(tiny_dir), "--text", text, "--max-page-mb", "0.01",
                         "--out", str(tmp_path / "big.html")], capsys)
    assert code == 2 and err.count("\n") == 1 and "--max-tokens" in err
    monkeypatch.setattr(build, "prompt_view", real_view)
    page = flowray.explore(lm, text, tmp_path / "fits.html", max_tokens=40, max_page_mb=limit_mb)
    assert 0.85 * limit_mb * 1e6 < page.stat().st_size <= limit_mb * 1e6, "the estimate is the page's real size"
