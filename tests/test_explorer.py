"""The route explorer page: its data encoding, and the page itself in a real (headless) Chromium."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

from explore_helpers import ABC, IOI, Page, browser, tiny_loaded  # noqa: F401  (browser is a fixture)
from flowray.errors import InputError
from flowray.explorer.data import PromptView, pack_lower, unb64
from flowray.explorer.page import explorer_html, write_explorer
from flowray.routes import extract_route

TAUS = (0.005, 0.02, 0.04, 0.1, 0.3)


@pytest.fixture(scope="module")
def views():
    """Sequential (Llama, GQA) and parallel (GPT-NeoX) tiny models, two prompts each."""
    from flowray.explorer.build import prompt_view

    out = {}
    for case in ("llama-gqa", "neox-parallel"):
        lm = tiny_loaded(case)
        out[case] = [prompt_view(lm, IOI), prompt_view(lm, ABC, position=5)]
    return out


@pytest.fixture(scope="module")
def pages(views, tmp_path_factory):
    d = tmp_path_factory.mktemp("pages")
    return {
        "single": write_explorer(views["llama-gqa"], d / "single.html", tau=0.04),
        "parallel": write_explorer(views["neox-parallel"], d / "parallel.html", tau=0.02),
        "compare": write_explorer(views["llama-gqa"], d / "compare.html", compare=True, tau=0.04),
    }


def _key(node):
    return (node.layer, node.position, node.kind.value)


def _route_from_page(r):
    """The page's serialised route in Python's terms: node set, edge -> (importance, heads)."""
    nodes = {tuple(n) for n in r["nodes"]}
    edges = {(tuple(e["source"]), tuple(e["target"]), e["kind"]): (e["importance"], e["heads"]) for e in r["edges"]}
    return nodes, edges, len(r["edges"])


def _assert_same_route(page_route, route):
    nodes, edges, n_edges = _route_from_page(page_route)
    assert nodes == {_key(n) for n in route.nodes}
    assert n_edges == len(route.edges) == len(edges)
    for e in route.edges:
        imp, heads = edges[(_key(e.source), _key(e.target), e.kind.value)]
        assert imp == pytest.approx(e.importance, rel=1e-5, abs=1e-7)
        assert [h for h, _ in heads] == [h.head for h in e.heads]
        np.testing.assert_allclose([v for _, v in heads], [h.importance for h in e.heads], rtol=1e-5, atol=1e-7)


# --- no browser -------------------------------------------------------------------------------------
def test_arrays_are_encoded_losslessly(views):
    import json
    import re

    v = views["llama-gqa"][0]
    html = explorer_html([v])
    data = json.loads(re.search(r'id="flowray-data">(.*?)</script>', html, re.S).group(1))
    p = data["prompts"][0]
    L, H, T, _ = v.imp.attn.shape
    packed = unb64(p["attn"], "<f4").reshape(L, H, T * (T + 1) // 2)
    assert np.array_equal(packed, pack_lower(v.imp.attn))
    assert np.array_equal(unb64(p["ffn_residual"], "<f4").reshape(L, T), v.imp.ffn_residual)
    assert np.array_equal(unb64(p["lens_ids"], "<i4").reshape(v.lens_ids.shape), v.lens_ids)
    assert p["tokens"] == v.imp.tokens and p["position"] == T - 1


def test_markup_in_tokens_cannot_end_the_data_block(views):
    from dataclasses import replace

    v = views["llama-gqa"][0]
    tokens = list(v.imp.tokens)
    tokens[1] = "</script><script>alert(1)</script>"
    html = explorer_html([replace(v, imp=replace(v.imp, tokens=tokens))])
    assert html.count("</script>") == 2  # the data block's and the code's own


def test_bad_views_are_refused(views):
    v = views["llama-gqa"][0]
    with pytest.raises(InputError, match="lens_ids must have shape"):
        PromptView(imp=v.imp, text="x", lens_ids=v.lens_ids[:-1], lens_probs=v.lens_probs, top_ids=v.top_ids,
                   top_probs=v.top_probs, vocab=v.vocab)
    with pytest.raises(InputError, match="exactly two prompts"):
        explorer_html([v], compare=True)
    with pytest.raises(InputError, match="must end in .html"):
        write_explorer([v], "route.png")


def test_top_of_the_lens_is_the_models_prediction(views):
    for case, (v, _) in views.items():
        top = v.lens_ids[-1, :, 0]  # the last block's output through the final norm and unembedding
        assert np.array_equal(top, v.top_ids[:, 0]), case
        assert np.array_equal(v.top_ids[:, 0], v.imp.predicted_ids), case


def test_a_30_layer_64_token_page_is_small(tmp_path):
    path = write_explorer([_synthetic(30, 9, 64)], tmp_path / "big.html")
    size = path.stat().st_size
    print(f"\n30 layers x 9 heads x 64 tokens: {size / 1e6:.2f} MB")
    assert size <= 5e6


# --- in the browser -----------------------------------------------------------------------------------
def test_page_loads_offline_without_errors(browser, pages):
    for name, path in pages.items():
        page = Page(browser, path)
        assert page.js("typeof window.flowray") == "object", name
        errors = [m for m in page.console if m[0] in ("error", "pageerror", "warning")]
        assert not errors, (name, errors)
        assert page.requests == [page.url], (name, page.requests)  # the file itself, nothing else
        page.close()


def test_page_arrays_equal_python_arrays(browser, pages, views):
    page = Page(browser, pages["single"])
    for i, v in enumerate(views["llama-gqa"]):
        got = page.js(f"""(() => {{ const P = flowray.prompts[{i}];
            return [Array.from(P.attn), Array.from(P.ar), Array.from(P.ffn), Array.from(P.fr),
                    Array.from(P.lensIds), Array.from(P.lensProbs), Array.from(P.topIds), Array.from(P.topProbs),
                    P.tokens]; }})()""")
        imp = v.imp
        for arr, want in zip(got[:4], (pack_lower(imp.attn), imp.attn_residual, imp.ffn, imp.ffn_residual)):
            assert np.array_equal(np.asarray(arr, dtype=np.float32), want.ravel())
        assert np.array_equal(np.asarray(got[4]), v.lens_ids.ravel())
        assert np.array_equal(np.asarray(got[5], dtype=np.float32), v.lens_probs.ravel())
        assert np.array_equal(np.asarray(got[6]), v.top_ids.ravel())
        assert np.array_equal(np.asarray(got[7], dtype=np.float32), v.top_probs.ravel())
        assert got[8] == list(imp.tokens)
    page.close()


@pytest.mark.parametrize("case,name", [("llama-gqa", "single"), ("neox-parallel", "parallel")])
def test_slider_routes_equal_extract_route(browser, pages, views, case, name):
    page = Page(browser, pages[name])
    for i, v in enumerate(views[case]):
        page.js(f"flowray.setPrompt({i})")
        T = v.imp.n_tokens
        # taus at exact float32 values of a sub-edge and of a direct part: the comparison edge cases
        edge_taus = (float(v.imp.attn[1, 0, T - 1, 2]), float(v.imp.attn_residual[0, T - 1]))
        for pos in (T - 1, 0, T // 2):
            page.js(f"flowray.setPosition(0, {pos})")
            for tau in TAUS + edge_taus:
                if not 0 < tau < 1:
                    continue
                page.js(f"flowray.setTau({tau!r})")
                route = extract_route(v.imp, tau=tau, position=pos)
                drawn = page.js("flowray.drawn(0)")
                assert (drawn["nodes"], drawn["edges"]) == (len(route.nodes), len(route.edges)), (case, i, pos, tau)
                _assert_same_route(page.js("flowray.route(0)"), route)
    page.close()


def test_the_text_selector_and_the_slider_drive_the_view(browser, pages, views):
    page = Page(browser, pages["single"])
    v = views["llama-gqa"][1]
    page.page.select_option("#prompt", "1")  # the --file page's text selector
    page.page.fill("#tau-num", "0.1")
    page.page.dispatch_event("#tau-num", "change")
    route = extract_route(v.imp, tau=0.1, position=v.position)
    drawn = page.js("flowray.drawn(0)")
    assert (drawn["nodes"], drawn["edges"]) == (len(route.nodes), len(route.edges))
    assert page.page.input_value("select.pos") == str(v.position)
    assert f"{len(route.edges)} edges" in page.page.inner_text(".stats")
    page.page.click(f'svg text.tok[data-pos="2"]')  # a click on a token shows its prediction's route
    route = extract_route(v.imp, tau=0.1, position=2)
    assert page.js("flowray.drawn(0)")["edges"] == len(route.edges)
    page.close()


@pytest.mark.slow
def test_smollm2_ioi_page_matches_python(browser, smollm2, tmp_path):
    """30 layers of real importances: the float32/float64 comparisons of extract_route hold in the page."""
    from flowray.explorer.build import prompt_view

    from conftest import IOI_PROMPT

    v = prompt_view(smollm2, IOI_PROMPT)
    assert v.vocab[int(v.top_ids[-1, 0])] == " Mary"
    page = Page(browser, write_explorer([v], tmp_path / "ioi.html"))
    assert " Mary" in page.page.inner_text(".pred b")
    T = v.imp.n_tokens
    for pos in (T - 1, 6):
        page.js(f"flowray.setPosition(0, {pos})")
        for tau in (0.01, 0.02, 0.04, float(v.imp.attn[23, 0, T - 1, 1])):
            if not 0 < tau < 1:
                continue
            page.js(f"flowray.setTau({tau!r})")
            _assert_same_route(page.js("flowray.route(0)"), extract_route(v.imp, tau=tau, position=pos))
    page.close()


def test_clicking_a_node_shows_its_parts_and_logit_lens(browser, pages, views):
    v = views["llama-gqa"][0]
    page = Page(browser, pages["single"])
    T = v.imp.n_tokens
    layer = 1
    key = (2 * layer + 1) * T + (T - 1)  # the attention node x^{1A} of the last token
    page.page.mouse.click(*page.js(f"flowray.where(0, {{node: {key}}})"))  # a real click, hit-tested
    lens = page.page.locator("#panel table.lens td.lens-token").all_inner_texts()
    want = [v.vocab[int(i)] for i in v.lens_ids[2 * layer + 1, T - 1]]
    import json

    assert [json.loads(t) for t in lens] == want
    assert "after attention" in page.page.inner_text("#panel h2")
    # an attention edge lists its heads; a head opens its [pos, j] map
    route = page.js("flowray.route(0)")
    i = next(n for n, e in enumerate(route["edges"]) if e["kind"] == "attention" and e["source"][1] != e["target"][1])
    page.page.mouse.click(*page.js(f"flowray.where(0, {{edge: {i}}})"))
    assert page.page.locator("#panel table.heads tr").count() >= 1
    page.page.click("#panel .headlink >> nth=0")
    assert page.page.locator("#panel canvas#headmap").count() == 1
    page.close()


def test_screenshot_is_not_blank(browser, pages, tmp_path):
    import matplotlib.image as mpimg

    for name in ("single", "compare"):
        page = Page(browser, pages[name])
        png = page.page.screenshot(full_page=True)
        img = mpimg.imread(io.BytesIO(png), format="png")[..., :3]  # [h, w, 3] floats
        ink = (img < 0.9).any(-1).mean()
        blue = ((img[..., 2] > img[..., 0] + 0.2)).mean()  # attention edges are blue
        assert ink > 0.02 and blue > 0.001, (name, ink, blue)
        page.close()


def test_compare_mode_highlights_head_activation_differences(browser, pages, views):
    a, b = views["llama-gqa"]
    page = Page(browser, pages["compare"])
    assert page.js("flowray.state.views.length") == 2
    cells = page.page.locator("#diff td[data-head]")
    L, H = a.imp.n_layers, a.imp.n_heads
    assert cells.count() == L * H
    diff = a.imp.head_importance()[a.position] - b.imp.head_importance()[b.position]  # [L, H]
    worst = np.unravel_index(np.abs(diff).argmax(), diff.shape)
    assert f"L{worst[0]}H{worst[1]}" in page.page.inner_text("#diff p.top").split(",")[0]
    _assert_same_route(page.js("flowray.route(1)"), extract_route(b.imp, tau=0.04, position=b.position))
    only = {(l, h) for l, h in extract_route(a.imp, 0.04, a.position).heads()} - extract_route(b.imp, 0.04, b.position).heads()
    assert (page.js("flowray.drawn(0)").get("only") > 0) == bool(only)  # drawn in orange
    page.close()


_OVERLAP = """(sel) => { const p = document.querySelector('#panel').getBoundingClientRect();
  return [...document.querySelectorAll(sel)].filter(e => { const r = e.getBoundingClientRect();
    return r.width && r.left < p.right && p.left < r.right && r.top < p.bottom && p.top < r.bottom; }).length; }"""


@pytest.mark.parametrize("width", [1400, 1100])
def test_the_panel_covers_neither_side_of_a_comparison(browser, pages, views, width):
    """The help panel (open at first) and a node's panel leave both prompts' heads, predictions and routes visible."""
    page = Page(browser, pages["compare"], width=width)
    side_b = ".view:nth-child(2) .head, .view:nth-child(2) .pred, .view:nth-child(2) .text, .view:nth-child(2) .stack"
    assert page.js("!document.querySelector('#panel').hidden")
    assert page.js(_OVERLAP, side_b) == 0, "the help panel covers side B"
    T = views["llama-gqa"][1].imp.n_tokens
    page.page.mouse.click(*page.js(f"flowray.where(1, {{node: {3 * T + T - 1}}})"))  # side B's x^1 of the last token
    assert "logit lens" in page.page.inner_text("#panel").lower()
    assert page.js(_OVERLAP, side_b + ", #diff table") == 0, "a node's panel covers side B or the difference map"
    page.close()


def test_a_tau_change_redraws_in_under_200_ms(browser, tmp_path):
    """Slider input event -> painted frame on a 30-layer x 64-token page, measured and printed."""
    view = _synthetic(30, 9, 64)
    path = write_explorer([view], tmp_path / "big.html")
    page = Page(browser, path)
    times = page.js("""async () => {
        const out = {};
        for (const tau of [0.01, 0.02, 0.04, 0.1]) {
            out[tau] = [];
            for (const t of [tau + 0.001, tau, tau + 0.001, tau]) {
                const s = document.getElementById("tau");
                const t0 = performance.now();
                s.value = String(t);
                s.dispatchEvent(new Event("input"));  // what dragging the slider fires
                await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));  // painted
                out[tau].push(performance.now() - t0);
            }
        }
        return out; }""")
    page.js("flowray.setTau(0.01)")
    big = page.js("flowray.drawn(0)")
    want = extract_route(view.imp, tau=0.01)
    assert (big["nodes"], big["edges"]) == (len(want.nodes), len(want.edges))
    medians = {tau: float(np.median(ts)) for tau, ts in times.items()}
    print(f"\ntau change -> painted, 30 layers x 9 heads x 64 tokens (tau 0.01: {big['edges']} edges): median ms "
          + ", ".join(f"tau {tau}: {m:.0f}" for tau, m in medians.items())
          + f"; max {max(max(ts) for ts in times.values()):.0f} ms")
    # asserted where the stress page's routes (up to ~5k edges at tau 0.02) are at least as large as
    # SmolLM2's at tau 0.01 (~3.5k on a 50-token text); tau 0.01 here (~10k edges) is printed only
    assert max(m for tau, m in medians.items() if float(tau) >= 0.02) < 200
    page.close()


def _synthetic(L: int, H: int, T: int, seed: int = 0) -> PromptView:
    """A SmolLM2-sized page without a model: each node's parts sum to 1, with a strong residual (85% on
    average) and sparse heads, like real importances; its routes are larger than SmolLM2's (at tau 0.01
    ~10k edges against ~3.5k on a 50-token text), so it is a stress test of the redraw."""
    from flowray.api import EdgeImportances

    rng = np.random.default_rng(seed)
    attn = np.zeros((L, H, T, T), dtype=np.float32)
    ar, ffn, fr = (np.zeros((L, T), dtype=np.float32) for _ in range(3))
    for pos in range(T):
        n = H * (pos + 1)
        alpha = np.full(n + 1, 0.03)
        alpha[-1] = 0.85 * n * 0.03 / 0.15  # the residual's expected share is 0.85
        w = rng.dirichlet(alpha, size=L).astype(np.float32)  # [L, parts]
        attn[:, :, pos, : pos + 1] = w[:, :-1].reshape(L, H, pos + 1)
        ar[:, pos] = w[:, -1]
    ffn[:] = rng.uniform(0.1, 0.7, (L, T))
    fr[:] = 1 - ffn
    imp = EdgeImportances(attn=attn, attn_residual=ar, ffn=ffn, ffn_residual=fr, token_ids=np.arange(T),
                          tokens=[f"t{i}" for i in range(T)], predicted_ids=np.zeros(T, dtype=np.int64))
    k, N = 5, 2 * L + 1
    ids = rng.integers(0, 49152, (N, T, k)).astype(np.int32)
    top = rng.integers(0, 49152, (T, k)).astype(np.int32)
    vocab = {int(i): f" tok{i}" for i in np.unique(np.concatenate([ids.ravel(), top.ravel()]))}
    probs = np.sort(rng.dirichlet(np.ones(k), (N, T)).astype(np.float32), -1)[..., ::-1].copy()
    return PromptView(imp=imp, text="synthetic", lens_ids=ids, lens_probs=probs, top_ids=top,
                      top_probs=probs[-1], vocab=vocab, model="synthetic-30x64")


def test_page_and_report_modules_need_no_torch():
    import subprocess
    import sys

    code = ("import sys, flowray.explorer.page, flowray.explorer.report; "
            "print(','.join(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr
