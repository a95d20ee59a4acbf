"""The Triton backend equals the CPU kernel and the float64 reference (run under Triton's interpreter here).

The interpreter runs one program at a time in numpy, in float32 (it has no half-precision dot): the shapes
stay tiny, and the half-precision claims the GPU path rests on are checked in torch at the end.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_stats import TAUS, _assert_equal_to_dense, _words
from tiny_models import CASES, NEW_CASES, VOCAB, tiny_model

import flowray
from flowray.batch_stats import BatchState
from flowray.errors import InputError, MissingDependencyError
from flowray.kernels import KernelConfig, resolve_backend, select_kernel
from flowray.stats import prediction_stats_batch

pytest.importorskip("triton", reason="the Triton backend's tests need triton (pip install triton; in the dev extra)")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="the Triton programs need a CUDA device or TRITON_INTERPRET=1 (conftest sets it)")
DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _naive_sub_edges(y, probs, values, w_o):
    """float64 ``prox(a F, y)`` of every sub-edge of ``G`` sequences, materialised: ``[G, H, C, J]``."""
    H = probs.shape[1]
    v = values.double().repeat_interleave(H // values.shape[1], 1)  # [G, H, T, dh]
    F = torch.einsum("ghtm,hmd->ghtd", v, w_o.double())  # [G, H, T, d]
    Z = probs.double()[..., None] * F[:, :, None, : probs.shape[3]]  # [G, H, C, J, d]
    yy = y.double()[:, None, :, None, :]
    return (yy.abs().sum(-1) - (yy - Z).abs().sum(-1)).clamp_min(0)


@pytest.mark.parametrize("seed", range(3))
def test_sub_edges_of_random_tensors_of_odd_sizes(seed):
    """A batch of sequences, GQA, exact zeros in y; each exact case and the rare paths: a few coordinates per
    tile, both lists, lists too small (their tiles go over every coordinate), sources in windows."""
    g = torch.Generator().manual_seed(seed)
    G, (H, H_kv) = 1 + seed % 3, [(1, 1), (3, 3), (6, 2), (4, 1)][seed]
    T, d, dh = int(torch.randint(2, 21, (1,), generator=g)), int(torch.randint(1, 34, (1,), generator=g)), 1 + seed
    y = torch.randn(G, T, d, generator=g) * (0.1 + 3 * float(torch.rand(1, generator=g)))
    y[torch.rand(G, T, d, generator=g) < 0.15] = 0.0
    logits = torch.randn(G, H, T, T, generator=g) * 3
    probs = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    values, w_o = torch.randn(G, H_kv, T, dh, generator=g), torch.randn(H, dh, d, generator=g)
    ref = _naive_sub_edges(y, probs, values, w_o) * torch.ones(T, T, dtype=torch.float64).tril()
    scale = y.double().abs().sum(-1)[:, None, :, None] + 1e-12  # errors relative to the node's l1 norm
    base = KernelConfig()
    for config in (base, replace(base, tile_coords=1, list_coords=2), replace(base, list_share=1 << 40),
                   replace(base, tile_coords=2, list_coords=3, f_budget=G * H * d * 16),
                   replace(base, triton_tile=(16, 16), triton_head_block=16)):
        kernel = select_kernel("triton", DEVICE, config)
        got = kernel.sub_edge_block(y, probs, kernel.head_outputs(values, w_o), 0).double()
        assert float(((got - ref).abs() / scale).max()) < 1e-5, config


@pytest.mark.parametrize("case", CASES + NEW_CASES)
def test_every_family_matches_the_cpu_kernel(case):
    model = tiny_model(case, seed=3, attn="eager" if case.startswith("gemma2") else "sdpa")
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    ref = flowray.edge_importances(model, ids, backend="cpu")
    got = flowray.edge_importances(model, ids, backend="triton")
    for name in ("attn", "attn_residual", "ffn", "ffn_residual"):
        if getattr(ref, name) is not None:
            np.testing.assert_allclose(getattr(got, name), getattr(ref, name), atol=1e-5, rtol=0, err_msg=name)


def test_the_float64_reference_is_met_with_either_padding():
    from reference import reference_importances

    model = tiny_model("llama-gqa", seed=5, attn="sdpa")
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, VOCAB, (1, T), generator=gen) for T in (11, 4, 8)]
    refs = [reference_importances(model, s) for s in seqs]
    for padding in ("right", "left"):
        for got, ref in zip(flowray.edge_importances_batch(model, seqs, backend="triton", padding_side=padding), refs):
            for name in ("attn", "attn_residual", "ffn", "ffn_residual"):
                np.testing.assert_allclose(getattr(got, name), ref[name], atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize("case, padding", [("llama-gqa", "right"), ("llama-gqa", "left"), ("neox-parallel", "left"),
                                           ("gemma2", "right")])
def test_the_job_statistics_of_a_ragged_batch_equal_the_dense_path(case, padding):
    """GQA, parallel blocks, a post-attention norm with soft-capping and sliding windows; left and right
    padding; words and sources: components, shares, sources, routes, pruned heads and predictions."""
    model = tiny_model(case, seed=3, attn="eager" if case == "gemma2" else "sdpa")
    gen = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, VOCAB, (1, T), generator=gen) for T in (13, 5, 9)]
    words = [_words(s.shape[1], i) for i, s in enumerate(seqs)]
    sources = [(12, [3, 7]), None, (8, [0, 8])]
    dense = flowray.edge_importances_batch(model, seqs, padding_side=padding, backend="cpu")
    got = prediction_stats_batch(model, seqs, TAUS, words=words, sources=sources, padding_side=padding,
                                 backend="triton")
    assert sum(_assert_equal_to_dense(d, s, w, TAUS, src) for d, s, w, src in zip(dense, got, words, sources)) > 0


def test_rare_paths_and_a_hit_slot_overflow_give_the_same_statistics(monkeypatch):
    """Every rare path at once: one coordinate per tile, lists that overflow, sources in windows, rows in
    blocks with recomputed weights, and one hit slot per node, so that the batch overflows and is redone."""
    overflows = []
    real = BatchState.overflow

    def spy(self):
        overflows.append(real(self))
        return overflows[-1]

    monkeypatch.setattr(BatchState, "overflow", spy)
    model = tiny_model("llama-gqa", seed=4, attn="sdpa")
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, VOCAB, (1, T), generator=gen) for T in (14, 5)]
    dense = flowray.edge_importances_batch(model, seqs, backend="cpu")
    config = KernelConfig(tile_coords=1, list_coords=2, list_share=1 << 40, f_budget=2 * 6 * 30 * 8,
                          element_budget=2 * 6 * 14 * 8, hits_per_node=1)
    got = prediction_stats_batch(model, seqs, TAUS, backend="triton", kernel_config=config)
    assert overflows[0] > 1 and overflows[-1] == 0, "one slot per node must overflow, then the redo must fit"
    assert sum(_assert_equal_to_dense(d, s, None, TAUS) for d, s in zip(dense, got)) > 0


def test_tiles_that_are_not_powers_of_two_are_a_clear_error():
    for bad in (dict(triton_tile=(16, 24)), dict(triton_tile=(8, 64)), dict(triton_head_block=48)):
        with pytest.raises(InputError, match=r"Triton tiles must be powers of two of at least 16"):
            select_kernel("triton", DEVICE, KernelConfig(**bad))


def test_half_precision_products_the_gpu_path_relies_on_are_exact():
    """On GPUs the Triton backend multiplies in the model's half precision with float32 accumulation; exact
    because (1) sign(y) W_O has products +-w, (2) two half-precision numbers multiply exactly in float32,
    (3) a float32 number is the exact sum of three bfloat16 numbers (the split used for s . F = Gs . v)."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        w = (torch.randn(64, 48, generator=g) * 0.05).to(dtype)
        s = torch.where(torch.randn(64, generator=g) < 0, -1.0, 1.0).to(dtype)
        assert torch.equal((s[:, None] * w).double(), s.double()[:, None] * w.double())  # (1)
        v = (torch.randn(64, 48, generator=g) * 3).to(dtype)
        assert torch.equal((w.float() * v.float()).double(), w.double() * v.double())  # (2)
    a = torch.randn(4096, generator=g) * torch.logspace(-20, 20, 4096)
    hi = a.to(torch.bfloat16)
    rest = a - hi.float()
    mid = rest.to(torch.bfloat16)
    lo = (rest - mid.float()).to(torch.bfloat16)
    assert torch.equal(hi.double() + mid.double() + lo.double(), a.double())  # (3)


def test_backend_choice_and_its_errors(monkeypatch, caplog):
    import importlib.util

    assert resolve_backend("auto", "cpu") == "cpu"
    with pytest.raises(InputError, match=r"backend must be one of \['auto', 'cpu', 'torch', 'triton'\]; got 'gpu'"):
        resolve_backend("gpu", "cpu")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(InputError, match="backend 'triton' needs a CUDA device"):
        resolve_backend("triton", "cpu")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(MissingDependencyError, match="pip install triton"):
        resolve_backend("triton", "cuda")
    with caplog.at_level(logging.INFO, logger="flowray.kernels"):
        assert resolve_backend("auto", "cuda") == "torch"  # no triton on a GPU machine: the torch backend
    assert "triton is not installed" in caplog.text
