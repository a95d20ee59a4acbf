"""Patching baselines: knockout, head patching and ablation are exact interventions; the comparison report.

Knockout's own checks are in test_knockout.py.
"""

from __future__ import annotations

import argparse
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from flowray import baselines as bl
from flowray.baselines import rank_heads, rankdata, spearman, top_k
from flowray.errors import InputError
from flowray.models.families import adapter_for
from flowray.routes import route_flows
from tiny_models import VOCAB, tiny_model


def _ids(B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


# --- attention knockout ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["gpt2", "llama-gqa", "neox-parallel", "opt"])
def test_patching_with_the_clean_runs_own_heads_changes_nothing(case):
    model = tiny_model(case, seed=7)
    adapter = adapter_for(model)
    s = adapter.shape
    ids = _ids(2, 6, seed=7)
    acts, logits = bl.head_outputs(model, adapter, ids)
    assert acts.shape == (s.n_layers, 2, 6, s.n_heads, s.head_dim)
    grid = torch.cartesian_prod(torch.arange(2), torch.arange(s.n_layers), torch.arange(s.n_heads))
    with bl.replace_heads(model, adapter, grid[:, 0], grid[:, 1], grid[:, 2], source=acts, source_rows=grid[:, 0]):
        patched = bl.last_logits(model, ids)
    torch.testing.assert_close(patched, logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, bl.last_logits(model, ids), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, _logits(model, ids)[:, -1], atol=1e-5, rtol=1e-6)  # all-position head


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa", "neox-parallel", "qwen2"])
def test_patching_every_head_of_a_layer_equals_patching_the_attention_output(case):
    """All heads of layer l from the corrupted run = the layer's whole attention output from that run."""
    model = tiny_model(case, seed=8)
    adapter = adapter_for(model)
    s = adapter.shape
    clean, corrupt = _ids(1, 7, seed=8), _ids(1, 7, seed=9)
    l = s.n_layers - 2
    attention = adapter.attention(adapter.layers()[l])
    saved = {}
    handle = attention.register_forward_hook(lambda m, a, o: saved.__setitem__("out", o[0].clone()))
    _logits(model, corrupt)
    handle.remove()
    handle = attention.register_forward_hook(lambda m, a, o: (saved["out"], *o[1:]))
    try:
        want = _logits(model, clean)[0, -1]
    finally:
        handle.remove()
    acts, _ = bl.head_outputs(model, adapter, corrupt)
    heads = torch.arange(s.n_heads)
    with bl.replace_heads(model, adapter, torch.zeros_like(heads), torch.full_like(heads, l), heads,
                          source=acts, source_rows=torch.zeros_like(heads)):
        got = bl.last_logits(model, clean)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
    assert (got - _logits(model, clean)[0, -1]).abs().max() > 1e-3


def test_patching_sweep_bookkeeping():
    model = tiny_model("llama-bias", seed=10)
    adapter = adapter_for(model)
    s = adapter.shape
    clean, corrupt = _ids(3, 6, seed=10), _ids(3, 6, seed=11)
    answer, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    res = bl.patching_sweep(model, adapter, clean, corrupt, answer, wrong, batch_size=5)
    assert res.ld_patched.shape == (3, s.n_layers, s.n_heads)

    def ld(logits, p):
        return float(logits[answer[p]] - logits[wrong[p]])

    acts, corrupt_logits = bl.head_outputs(model, adapter, corrupt)
    for p in range(3):
        assert res.ld_corrupt[p] == pytest.approx(ld(corrupt_logits[p], p), abs=1e-5)
        assert res.ld_clean[p] == pytest.approx(ld(_logits(model, clean)[p, -1], p), abs=1e-5)
    for p, l, h in [(0, 0, 0), (1, 1, 2), (2, 0, 1)]:
        with bl.replace_heads(model, adapter, [0], [l], [h], source=acts, source_rows=[p]):
            logits = bl.last_logits(model, clean[p : p + 1])[0]
        assert res.ld_patched[p, l, h] == pytest.approx(ld(logits, p), abs=1e-5)
    effect = res.effect()
    np.testing.assert_allclose(
        effect, (res.ld_clean[:, None, None] - res.ld_patched).mean(0) / (res.ld_clean - res.ld_corrupt).mean(),
        rtol=1e-6,
    )


def test_patching_rejects_twins_of_different_lengths():
    model = tiny_model("gpt2")
    adapter = adapter_for(model)
    with pytest.raises(InputError, match="same shape"):
        bl.patching_sweep(model, adapter, _ids(2, 5, 0), _ids(2, 6, 0), [1, 2], [3, 4])
    with pytest.raises(InputError, match="one token id per prompt"):
        bl.patching_sweep(model, adapter, _ids(2, 5, 0), _ids(2, 5, 1), [1], [3, 4])


# --- ablation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["gpt2", "llama-gqa", "neox-sequential", "opt"])
def test_ablating_no_heads_is_the_identity(case):
    model = tiny_model(case, seed=12)
    adapter = adapter_for(model)
    ids = _ids(2, 6, seed=12)
    plain = bl.last_logits(model, ids)
    assert torch.equal(bl.ablate_heads(model, adapter, ids, [], mode="zero"), plain)
    means = bl.head_means(model, adapter, ids[:1])
    assert torch.equal(bl.ablate_heads(model, adapter, ids, [], mode="mean", means=means), plain)


def _zero_w_o_slice(model, adapter, l: int, h: int):
    """A copy of ``model`` whose W_O ignores head (l, h): its input slice's weights set to zero."""
    model = copy.deepcopy(model)
    adapter = adapter_for(model)
    w_o = adapter.head_output_module(adapter.layers()[l])
    dh = adapter.shape.head_dim
    with torch.no_grad():
        if isinstance(w_o, nn.Linear):  # weight [d, H * dh]
            w_o.weight[:, h * dh : (h + 1) * dh] = 0
        else:  # GPT-2 Conv1D weight [H * dh, d]
            w_o.weight[h * dh : (h + 1) * dh, :] = 0
    return model


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa", "neox-parallel", "qwen2"])
def test_zero_ablating_a_head_equals_zeroing_its_w_o_slice(case):
    model = tiny_model(case, seed=13)
    adapter = adapter_for(model)
    ids = _ids(2, 7, seed=13)
    l, h = 1, adapter.shape.n_heads - 1
    got = bl.ablate_heads(model, adapter, ids, [(l, h)], mode="zero")
    want = _logits(_zero_w_o_slice(model, adapter, l, h), ids)[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
    assert (got - _logits(model, ids)[:, -1]).abs().max() > 1e-4


def test_mean_ablation_uses_the_reference_mean_and_per_row_masks():
    model = tiny_model("llama-gqa", seed=14)
    adapter = adapter_for(model)
    ids, ref = _ids(2, 6, seed=14), _ids(4, 6, seed=15)
    means = bl.head_means(model, adapter, ref)
    acts, _ = bl.head_outputs(model, adapter, ref)
    torch.testing.assert_close(means, acts.mean(1))
    # mean-ablating with the prompt's own outputs as the "mean" changes nothing
    own, _ = bl.head_outputs(model, adapter, ids[:1])
    same = bl.ablate_heads(model, adapter, ids[:1], [(0, 1), (2, 5)], mode="mean", means=own[:, 0])
    torch.testing.assert_close(same, _logits(model, ids[:1])[:, -1], atol=1e-6, rtol=0)
    # per-row masks in one batch equal separate calls
    masks = torch.zeros(2, adapter.shape.n_layers, adapter.shape.n_heads, dtype=torch.bool)
    masks[0, 0, 1] = True
    masks[1, 2, 3] = masks[1, 1, 0] = True
    both = bl.ablate_heads(model, adapter, ids, masks, mode="mean", means=means)
    for r in range(2):
        alone = bl.ablate_heads(model, adapter, ids[r : r + 1], masks[r], mode="mean", means=means)
        torch.testing.assert_close(both[r : r + 1], alone, atol=1e-5, rtol=1e-6)
    answer, wrong = torch.tensor([1, 2]), torch.tensor([3, 4])
    sweep = bl.ablation_sweep(model, adapter, ids, masks, answer, wrong, mode="mean", means=means, batch_size=3)
    for c in range(2):
        logits = bl.ablate_heads(model, adapter, ids, masks[c], mode="mean", means=means)
        np.testing.assert_allclose(sweep[c], bl.logit_diff(logits, answer, wrong).numpy(), atol=1e-5)


def test_ablation_input_errors():
    model = tiny_model("gpt2")
    adapter = adapter_for(model)
    ids = _ids(1, 5, 0)
    with pytest.raises(InputError, match="mode must be one of"):
        bl.ablate_heads(model, adapter, ids, [(0, 0)], mode="resample")
    with pytest.raises(InputError, match="needs means"):
        bl.ablate_heads(model, adapter, ids, [(0, 0)], mode="mean")
    with pytest.raises(InputError, match="outside the model"):
        bl.ablate_heads(model, adapter, ids, [(9, 0)], mode="zero")
    with pytest.raises(InputError, match=r"shape \[B, T\]"):
        bl.ablate_heads(model, adapter, ids[0], [(0, 0)], mode="zero")


# --- comparison maths -------------------------------------------------------------------------------------
def test_rank_statistics_by_hand():
    np.testing.assert_allclose(rankdata([10, 30, 20, 20]), [1, 4, 2.5, 2.5])
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks a = [1, 2, 3], b = [1, 3, 2]: rho = 1 - 6 * 2 / (3 * 8) = 0.5
    assert spearman([0.1, 0.5, 0.9], [1, 7, 3]) == pytest.approx(0.5)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert top_k(np.array([0.3, 0.0, 0.9, 0.0]), 3, positive_only=True) == {0, 2}
    assert top_k(np.array([1, 5, 5, 2]), 2) == {1, 2}
    assert rank_heads(np.array([[0.5, 1.0], [1.0, 0.2]]), np.array([[0, 0], [3, 0]]))[:2] == [(1, 0), (0, 1)]


def test_route_flows_by_hand():
    """A one-layer route: top <- (ffn .6, residual .4) <- attn node <- (self .5, token 0 via heads .3 + .2)."""
    from flowray.routes import Edge, EdgeKind, HeadImportance, Node, NodeKind, Route

    top, mid = Node(0, 1, NodeKind.BLOCK), Node(0, 1, NodeKind.ATTN)
    e0, e1 = Node(0, 0, NodeKind.EMBED), Node(0, 1, NodeKind.EMBED)
    edges = (
        Edge(mid, top, EdgeKind.FFN, 0.6),
        Edge(mid, top, EdgeKind.RESIDUAL, 0.4),
        Edge(e1, mid, EdgeKind.RESIDUAL, 0.5),
        Edge(e0, mid, EdgeKind.ATTENTION, 0.5, (HeadImportance(1, 0.3), HeadImportance(0, 0.2))),
    )
    route = Route(position=1, tau=0.1, n_layers=1, n_heads=2, parallel=False, tokens=("a", "b"),
                  nodes=(e0, e1, mid, top), edges=edges)
    head_flow, pair_flow, pair_imp = route_flows(route, 2)
    # the attn node receives all of the top's weight (0.6 + 0.4), then passes 0.5 of it to token 0
    np.testing.assert_allclose(head_flow, [[0.2, 0.3]])
    np.testing.assert_allclose(pair_flow, [[0, 0], [0.5, 0]])
    np.testing.assert_allclose(pair_imp, [[0, 0], [0.5, 0]])


# --- the comparison run, end to end on a tiny model ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_lm(smollm2):
    """A tiny random Llama with SmolLM2's tokenizer (vocabulary 49152, d = 16)."""
    import transformers as tf

    from flowray.models.loading import LoadedModel

    cfg = tf.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                         hidden_size=16, intermediate_size=24, vocab_size=len(smollm2.tokenizer),
                         max_position_embeddings=64)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than HF's init, so logit differences are not ~0
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    return LoadedModel(model=model, tokenizer=smollm2.tokenizer, adapter=adapter_for(model), name="tiny-llama")


def test_run_comparison_writes_the_report(tiny_lm, tmp_path, capsys):
    from flowray.baselines import run_comparison, write_report

    summary = run_comparison(tiny_lm, n=4, seed=1, out_dir=tmp_path, tau=0.05, ks=(1, 3, 100), random_draws=2,
                             progress=True, top=3, batch_size=32, reference_n=4)
    bars = capsys.readouterr().err  # not a terminal here, as in a log file or under `ray job submit`
    assert "routes + patching + knockout + EAP" in bars and "\x1b[" not in bars, repr(bars[-300:])
    for name in ("report.md", "summary.json", "arrays.npz", "faithfulness.png", "heads_grid.png",
                 "heads_scatter.png", "pairs_example.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    report = (tmp_path / "report.md").read_text()
    for section in ("## Setup", "## Time", "## Agreement: heads", "## Agreement: token-to-token connections",
                    "## Faithfulness", "## Discussion", "## Figures"):
        assert section in report, section
    assert "torch threads" in report and "run_comparison(model='tiny-llama', n=4" in report
    t = summary["timing"]
    P = summary["n_used"]
    assert P == 4 and t["patching_forward_passes"] == P * 2 * 4
    assert all(t[k] > 0 for k in ("routes_batched_s", "routes_s", "patching_s", "knockout_s", "eap_s"))
    for method in ("patching", "knockout", "eap"):  # stable keys; the headline is over the batched routes
        assert t["ratios"][method] == pytest.approx(t[f"{method}_s"] / t["routes_batched_s"])
        assert t["ratios_unbatched_cpu"][method] == pytest.approx(t[f"{method}_cpu_s"] / t["routes_cpu_s"])
        assert f"**{t['ratios'][method]:.1f}x**" in report
    split = t["split_per_prompt_s"]
    parts = ("forward", "importances", "routes", "python_overhead", "outside_split")
    assert sum(split[k] for k in parts) == pytest.approx(split["total"]) and split["forward"] > 0
    assert t["routes_batched_same_heads"]  # the batched statistics give the one-prompt routes' heads
    assert 0 <= summary["heads"]["overlap_diff_vs_patching"] <= 3
    assert 0 <= summary["heads"]["overlap_eap_vs_patching"] <= 3
    assert summary["faithfulness"]["ks"] == [1, 3]  # k = 100 > 2 layers x 4 heads is dropped
    curves = summary["faithfulness"]["curves"]
    assert set(curves) == {"routes: activation frequency", "routes: contrastive frequency difference",
                           "patching effect", "EAP (attribution patching)", "random"}
    arrays = np.load(tmp_path / "arrays.npz")
    assert arrays["patching_effect"].shape == arrays["eap_effect"].shape == (2, 4)
    assert write_report(tmp_path).read_text() == report  # summary.json holds everything the report shows


def test_cli_registers_compare(tmp_path):
    from flowray.cli import register_compare

    parser = argparse.ArgumentParser()
    register_compare(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--n", "3", "--ks", "1,4", "--out", str(tmp_path), "--no-progress"])
    assert args.n == 3 and args.ks == (1, 4) and callable(args.handler)
    with pytest.raises(SystemExit):
        parser.parse_args(["compare", "--ks", "0,x"])


def test_compare_output_folder_is_named_in_help_and_ignored_by_git(capsys):
    import subprocess
    from pathlib import Path

    from flowray.cli import main

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "(default: compare-out)" in " ".join(capsys.readouterr().out.split())
    repo = Path(__file__).resolve().parents[1]
    ignored = subprocess.run(["git", "check-ignore", "-q", "compare-out/report.md"], cwd=repo, check=False)
    assert ignored.returncode == 0, "compare's default output folder is not in .gitignore"
