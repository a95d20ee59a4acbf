"""The fast importance path equals the naive materialising reference; invariants; failure modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flowray
from flowray.errors import InputError, UnsupportedArchitectureError
from flowray.importance import attention_node, normalise, proximity, sub_edge_proximity
from reference import reference_importances
from tiny_models import CASES, VOCAB, tiny_model

TOL = 1e-5


def _ids(T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(seed))


def _assert_close(got, ref):
    for name in ("attn", "attn_residual", "ffn"):
        np.testing.assert_allclose(getattr(got, name), ref[name], atol=TOL, rtol=0, err_msg=name)
    if ref["ffn_residual"] is None:
        assert got.ffn_residual is None
    else:
        np.testing.assert_allclose(got.ffn_residual, ref["ffn_residual"], atol=TOL, rtol=0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("T", [7, 13])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_matches_naive_reference(case, T, attn):
    """attn="sdpa": flowray captures through its own attention function; "eager": through transformers'.
    The reference always runs transformers' eager attention and reads the weights itself."""
    model = tiny_model(case, seed=T, attn=attn)
    ids = _ids(T, seed=T)
    ref = reference_importances(model, ids)
    # the reference's parts add up to what the attention module really output (it read the weights itself)
    assert ref["decomposition_error"] < 1e-4
    _assert_close(flowray.edge_importances(model, ids), ref)


@pytest.mark.parametrize("case", CASES)
def test_torch_backend_matches_naive_reference(case):
    """Both kernels against the reference on every family (the "auto" runs above use the CPU kernel)."""
    model = tiny_model(case, seed=13, attn="sdpa")
    ids = _ids(13, seed=13)
    ref = reference_importances(model, ids)
    _assert_close(flowray.edge_importances(model, ids, backend="torch"), ref)
    _assert_close(flowray.edge_importances(model, ids, backend="cpu"), ref)


@pytest.mark.parametrize("case", ["llama-gqa", "neox-parallel", "gpt2"])
def test_chunking_and_budgets_do_not_change_results(case):
    model = tiny_model(case, seed=3)
    ids = _ids(11, seed=4)
    ref = reference_importances(model, ids)
    for kw in (dict(chunk_size=1), dict(chunk_size=4, element_budget=7), dict(chunk_size=3, element_budget=1)):
        _assert_close(flowray.edge_importances(model, ids, **kw), ref)


def _naive_sub_edges(y, probs, values, w_o):
    H, T, _ = probs.shape
    F = torch.bmm(values.double().repeat_interleave(H // values.shape[0], 0), w_o.double())  # [H, T, d]
    Z = probs.double()[:, :, :, None] * F[:, None, :, :]  # [H, pos, j, d]
    y = y.double()
    prox = (y.abs().sum(-1)[None, :, None] - (y[None, :, None, :] - Z).abs().sum(-1)).clamp_min(0)
    return prox * torch.ones(T, T, dtype=torch.float64).tril()


@pytest.mark.parametrize("seed", range(12))
def test_kernel_on_random_tensors_of_odd_sizes(seed):
    """Random shapes, exact zeros in y (the sign(0) case), every branch: no/ragged/dense correction."""
    g = torch.Generator().manual_seed(seed)
    H, H_kv = [(1, 1), (3, 3), (6, 2), (9, 3)][seed % 4]
    T = int(torch.randint(1, 23, (1,), generator=g))
    d = int(torch.randint(1, 97, (1,), generator=g))
    dh = int(torch.randint(1, 9, (1,), generator=g))
    y = torch.randn(T, d, generator=g) * (0.1 + 3 * float(torch.rand(1, generator=g)))
    y[torch.rand(T, d, generator=g) < 0.15] = 0.0
    logits = torch.randn(H, T, T, generator=g) * 3
    probs = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    values = torch.randn(H_kv, T, dh, generator=g)
    w_o = torch.randn(H, dh, d, generator=g)
    ref = _naive_sub_edges(y, probs, values, w_o)
    scale = y.double().abs().sum(-1)[None, :, None] + 1e-12  # errors relative to the node's l1 norm
    garbage = torch.full((H, T, T), float("nan"))  # out= must be overwritten everywhere, upper triangle too
    strided = torch.full((H, T, T), float("nan")).transpose(1, 2)  # a non-contiguous out=
    for kw in (dict(backend="cpu"), dict(backend="cpu", out=garbage), dict(backend="cpu", out=strided), dict(backend="torch"),
               dict(backend="torch", dense_rank=0), dict(backend="torch", dense_rank=2),
               dict(backend="torch", dense_rank=3, chunk_size=2, element_budget=5),
               dict(backend="torch", dense_rank=10_000, chunk_size=1, element_budget=1)):
        got = sub_edge_proximity(y, probs, values, w_o, **kw).double()
        assert float(((got - ref).abs() / scale).max()) < 1e-5, kw
        assert torch.all(got.triu(1) == 0)  # future positions are not parts


def test_cpu_kernel_takes_non_contiguous_views_and_checks_its_arguments():
    g = torch.Generator().manual_seed(5)
    T, d, H = 9, 33, 4
    y = torch.randn(T, 2 * d, generator=g)[:, ::2]  # a strided view
    probs = torch.rand(H, T, T, generator=g).transpose(1, 2)  # non-contiguous; any weights in [0, 1]
    values = torch.randn(T, 2, 5, generator=g).permute(1, 0, 2)  # [H_kv, T, dh] as a permuted view
    w_o = torch.randn(H, 5, d, generator=g)
    ref = _naive_sub_edges(y, probs, values, w_o)
    assert not (y.is_contiguous() or probs.is_contiguous() or values.is_contiguous())
    got = sub_edge_proximity(y, probs, values, w_o, backend="cpu").double()
    assert float(((got - ref).abs() / (y.abs().sum(-1)[None, :, None] + 1e-12)).max()) < 1e-5
    with pytest.raises(ValueError, match="backend must be one of"):
        sub_edge_proximity(y, probs, values, w_o, backend="gpu")
    with pytest.raises(ValueError, match=r"out must be a float32 \[H, T, T\]"):
        sub_edge_proximity(y, probs, values, w_o, out=torch.zeros(H, T, T + 1))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_both_backends_match_the_reference_end_to_end(backend):
    model = tiny_model("llama-gqa", seed=8, attn="sdpa")
    ids = _ids(17, seed=9)
    _assert_close(flowray.edge_importances(model, ids, backend=backend), reference_importances(model, ids))


def test_hand_computed_node():
    """y = (3, -1) with parts z1 = (2, 0), z2 = (1, -1): prox = 4 - 2 = 2 and 4 - 2 = 2 -> 1/2 each."""
    y = torch.tensor([[3.0, -1.0]])
    parts = torch.tensor([[[2.0, 0.0]], [[1.0, -1.0]]])
    assert proximity(parts, y).tolist() == [[2.0], [2.0]]
    # a part pointing away from y has proximity 0: ||y|| - ||y - z|| = 4 - 6 < 0
    assert proximity(torch.tensor([[[-1.0, 1.0]]]), y).tolist() == [[0.0]]
    assert normalise(None, proximity(parts, y)).direct.tolist() == [[0.5], [0.5]]


def test_all_zero_proximity_gives_zero_not_nan():
    sub = torch.zeros(2, 3, 3)
    direct = torch.zeros(1, 3)
    out = normalise(sub, direct)
    assert torch.equal(out.attn, sub) and torch.equal(out.direct, direct)


@pytest.mark.parametrize("case", ["opt", "llama-gqa", "neox-parallel", "neox-sequential"])
def test_parts_of_every_node_sum_to_one(case):
    imp = flowray.edge_importances(tiny_model(case, seed=1), _ids(9, seed=2))
    attn_node = imp.attn.sum(axis=(1, 3)) + imp.attn_residual
    if imp.parallel:
        attn_node = attn_node + imp.ffn
    else:
        np.testing.assert_allclose(imp.ffn + imp.ffn_residual, 1.0, atol=1e-5)
    np.testing.assert_allclose(attn_node, 1.0, atol=1e-5)
    assert np.all(np.triu(imp.attn, 1) == 0)
    assert imp.component_importance().shape == (9, imp.n_layers * imp.n_heads + imp.n_layers)


def test_hooks_are_removed_and_attention_restored():
    model = tiny_model("llama-gqa", attn="sdpa")
    flowray.edge_importances(model, _ids(5, 0))
    assert model.config._attn_implementation == "sdpa"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(InputError):
        flowray.edge_importances(model, torch.full((1, 5), VOCAB + 3))  # id out of range: before any hook
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_bad_inputs():
    model = tiny_model("gpt2")
    with pytest.raises(InputError, match=r"shape \[1, T\]"):
        flowray.edge_importances(model, torch.tensor([1, 2, 3]))
    with pytest.raises(InputError, match="one sequence"):
        flowray.edge_importances(model, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(InputError, match="context of 64"):
        flowray.edge_importances(model, torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(InputError, match="chunk_size"):
        flowray.edge_importances(model, torch.ones(1, 3, dtype=torch.long), chunk_size=0)


def test_unsupported_architectures_fail_fast_with_the_supported_list():
    import transformers as tf

    mamba = tf.MambaForCausalLM(tf.MambaConfig(hidden_size=8, num_hidden_layers=1, vocab_size=11))
    with pytest.raises(UnsupportedArchitectureError, match="'mamba'.*supported families: llama"):
        flowray.edge_importances(mamba, torch.ones(1, 3, dtype=torch.long))
    post_ln = tf.OPTForCausalLM(tf.OPTConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=8,
                                             ffn_dim=8, do_layer_norm_before=False, vocab_size=11,
                                             word_embed_proj_dim=8))
    with pytest.raises(UnsupportedArchitectureError, match="do_layer_norm_before=False"):
        flowray.edge_importances(post_ln, torch.ones(1, 3, dtype=torch.long))


def test_save_and_load_round_trip(tmp_path):
    imp = flowray.edge_importances(tiny_model("neox-parallel"), _ids(6, 1))
    path = imp.save(tmp_path / "x.npz")
    back = flowray.EdgeImportances.load(path)
    assert back.ffn_residual is None and back.parallel
    np.testing.assert_array_equal(back.attn, imp.attn)
    np.testing.assert_array_equal(back.token_ids, imp.token_ids)


def test_the_benchmarked_materialising_algorithm_matches_the_reference():
    """bench/ times reference.materialising_importances; make sure it computes the same thing."""
    from reference import materialising_importances

    model = tiny_model("llama-gqa", seed=9)
    ids = _ids(10, seed=9)
    ref = reference_importances(model, ids)
    got = materialising_importances(model, ids)
    for name in ("attn", "attn_residual", "ffn", "ffn_residual"):
        np.testing.assert_allclose(got[name], ref[name], atol=TOL, rtol=0, err_msg=name)


@pytest.mark.parametrize("case", ["gpt2", "opt", "mistral", "neox-parallel"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batched_padded_pass_equals_single_passes(case, padding_side, attn):
    """Sequences of different lengths, padded on either side with an attention mask: each gets its own."""
    model = tiny_model(case, seed=4, attn=attn)
    seqs = [_ids(T, seed=T) for T in (5, 12, 1, 9)]
    batch = flowray.edge_importances_batch(model, seqs, padding_side=padding_side)
    for ids, got in zip(seqs, batch, strict=True):
        ref = reference_importances(model, ids)
        _assert_close(got, ref)
        np.testing.assert_array_equal(got.token_ids, ids[0].numpy())
        np.testing.assert_array_equal(got.predicted_ids, flowray.edge_importances(model, ids).predicted_ids)


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_tokenizer_style_padded_batch(side):
    """[B, T] ids + mask as `tokenizer(..., padding=True)` returns them, padded with a real pad id."""
    model = tiny_model("llama-gqa", seed=6, attn="sdpa")
    a, b = _ids(8, seed=1)[0], _ids(3, seed=2)[0]
    pad = torch.full((5,), 7)  # the pad id 7 is a real token, masked out
    row = torch.cat([pad, b]) if side == "left" else torch.cat([b, pad])
    ids = torch.stack([a, row])
    mask = torch.tensor([[1] * 8, [0] * 5 + [1] * 3 if side == "left" else [1] * 3 + [0] * 5])
    got = flowray.edge_importances_padded(model, ids, mask)
    assert [g.n_tokens for g in got] == [8, 3]
    _assert_close(got[1], reference_importances(model, b[None]))
    _assert_close(got[0], reference_importances(model, a[None]))


def test_bad_padding_is_refused_with_the_reason():
    model = tiny_model("gpt2", seed=1)
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(InputError, match="padding between real tokens"):
        flowray.edge_importances_padded(model, ids, torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]]))
    with pytest.raises(InputError, match="row 1 of attention_mask is all padding"):
        flowray.edge_importances_padded(model, ids, torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]))
    with pytest.raises(InputError, match="only 0 \\(padding\\) and 1"):
        flowray.edge_importances_padded(model, ids, torch.full((2, 4), 2))
    with pytest.raises(InputError, match="both have shape \\[B, T\\]"):
        flowray.edge_importances_padded(model, ids, torch.ones(2, 3))
    with pytest.raises(InputError, match="padding_side must be 'right' or 'left'"):
        flowray.edge_importances_batch(model, [ids[:1]], padding_side="middle")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_activations_with_float32_accumulation(dtype):
    """A bf16/fp16 model's own activations go into the kernel as they are (upcast, float32 sums); its
    importances stay within 1e-3 of float64 materialising maths on the very same activations."""
    from flowray.capture import capture_all

    model = tiny_model("llama-gqa", seed=2, attn="sdpa").to(dtype)
    adapter = flowray.models.families.adapter_for(model)
    records = capture_all(model, adapter, _ids(13, seed=3))
    assert records[0].probs.dtype == dtype
    for rec in records:
        w_o = adapter.output_projection(adapter.layers()[rec.layer])[0].detach()  # [H, dh, d] in dtype
        x, mid = rec.inputs[0], rec.inputs[0].double() + rec.attn_out[0].double()
        sub_ref = _naive_sub_edges(mid, rec.probs[0], rec.values[0], w_o)  # [H, T, T] float64
        direct_ref = proximity(x[None].double(), mid)  # [1, T]
        want = normalise(sub_ref, direct_ref)
        for backend in ("cpu", "torch"):
            got = attention_node(mid.float(), x[None], rec.probs[0], rec.values[0], w_o, backend=backend)
            assert got.attn.dtype == torch.float32
            np.testing.assert_allclose(got.attn.double(), want.attn, atol=1e-3, rtol=0, err_msg=backend)
            np.testing.assert_allclose(got.direct.double(), want.direct, atol=1e-3, rtol=0, err_msg=backend)


def test_the_capture_attention_takes_larger_row_chunks_on_a_gpu():
    """About 11 kernel launches per chunk: a GPU takes a whole 7B batch of 8 x 512 tokens (or SmolLM2's of 32 x 512)
    in one chunk, a 32k-token 7B text in chunks of 128 rows (scores within 512 MiB); a CPU always 128 rows."""
    from flowray.capture import _row_chunk

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _row_chunk(cuda, 8, 32, 512) >= 512 and _row_chunk(cuda, 32, 9, 512) >= 512
    assert _row_chunk(cuda, 8, 32, 1024) == 512
    assert 8 * 32 * 1024 * _row_chunk(cuda, 8, 32, 1024) * 4 <= 512 << 20
    assert _row_chunk(cuda, 1, 32, 32768) == 128 and _row_chunk(cpu, 8, 32, 512) == 128


@pytest.mark.parametrize("case", ["gpt2", "opt", "llama-gqa", "mistral", "qwen2", "neox-parallel"])
@pytest.mark.parametrize("chunk", [4, 128])
def test_capture_attention_equals_transformers_eager(monkeypatch, case, chunk):
    """flowray's capture attention (in chunks of `chunk` query rows; 4 splits these inputs into several)
    gives transformers' eager probabilities and outputs: causal, and left-padded with a boolean mask."""
    from flowray import capture
    from flowray.capture import capture_all

    monkeypatch.setattr(capture, "_ROW_CHUNK", chunk)
    ours, eager = tiny_model(case, seed=3, attn="sdpa"), tiny_model(case, seed=3, attn="eager")
    adapter_for = flowray.models.families.adapter_for  # each model's hooks on its own layers
    ids = _ids(13, seed=5)
    got_records, want_records = capture_all(ours, adapter_for(ours), ids), capture_all(eager, adapter_for(eager), ids)
    assert len(got_records) == len(want_records) == adapter_for(ours).shape.n_layers
    for got, want in zip(got_records, want_records, strict=True):
        # float32 sums in another order: probabilities within ~2e-6, outputs (|x| up to ~20) within ~2.5e-5
        # (deeper layers inherit the rounding of earlier ones); a swapped head or a wrong mask moves them by O(1)
        torch.testing.assert_close(got.probs, want.probs, atol=5e-6, rtol=0)
        torch.testing.assert_close(got.attn_out, want.attn_out, atol=1e-4, rtol=0)
        assert torch.all(got.probs.triu(1) == 0)
    assert ours.config._attn_implementation == "sdpa"  # restored after the capture
    batch = torch.stack([ids[0], torch.cat([torch.zeros(4, dtype=torch.long), ids[0, :9]])])
    mask = torch.tensor([[1] * 13, [0] * 4 + [1] * 9])
    logits = {}
    for name, model in (("ours", ours), ("eager", eager)):
        with flowray.capture.eager_attention(model), torch.no_grad():
            logits[name] = model(input_ids=batch, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(logits["ours"][1, 4:], logits["eager"][1, 4:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["ours"][0], logits["eager"][0], atol=1e-5, rtol=1e-5)


def test_capture_attention_refuses_a_cache_and_training_mode():
    from flowray.capture import _capture_attention

    module = torch.nn.Module().eval()
    q, kv = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)  # 3 queries against 5 cached keys
    with pytest.raises(UnsupportedArchitectureError, match="got 3 queries, 5 keys .*use_cache=False"):
        _capture_attention(module, q, kv, kv, None)
    with pytest.raises(UnsupportedArchitectureError, match="eval mode only; call model.eval"):
        _capture_attention(module.train(), q, q, q, None, dropout=0.1)
