"""The families of issue 13 (Gemma 2/3, Qwen3, Phi-3, OLMo-2, GPT-J, Phi-2, MoE FFNs) against the float64
materialising reference; the capture's records rebuild the model's real blocks; soft-capping; loading
PEFT/LoRA adapter directories; unsupported families fail fast."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import flowray
from flowray.models.attention import register_attention
from flowray import capture
from flowray.capture import capture_all
from flowray.errors import UnsupportedArchitectureError
from flowray.models.families import adapter_class_for, adapter_for, supported_model_types
from reference import reference_importances
from tiny_models import NEW_CASES, VOCAB, tiny_model

TOL = 1e-5
EAGER_ONLY = ("gemma2",)  # transformers refuses sdpa for Gemma 2 (it has no soft-capping)


def _ids(T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(seed))


def _model(case: str, seed: int, attn: str):
    """``attn="capture"``: flowray's own capture attention; ``"eager"``: transformers' eager attention."""
    model = tiny_model(case, seed=seed, attn="eager" if case in EAGER_ONLY else ("sdpa" if attn == "capture" else attn))
    if attn == "capture" and case in EAGER_ONLY:
        # an eager model keeps transformers' eager attention inside flowray; switch it to the capture one
        register_attention(capture.CAPTURE_IMPLEMENTATION, capture._capture_attention, "sdpa")
        model.set_attn_implementation(capture.CAPTURE_IMPLEMENTATION)
    return model


def _assert_close(got, ref):
    for name in ("attn", "attn_residual", "ffn"):
        np.testing.assert_allclose(getattr(got, name), ref[name], atol=TOL, rtol=0, err_msg=name)
    if ref["ffn_residual"] is None:
        assert got.ffn_residual is None
    else:
        np.testing.assert_allclose(got.ffn_residual, ref["ffn_residual"], atol=TOL, rtol=0)


@pytest.mark.parametrize("case", NEW_CASES)
@pytest.mark.parametrize("T, attn", [(7, "capture"), (13, "capture"), (13, "eager")])
def test_matches_naive_reference(case, T, attn):
    model = _model(case, seed=T, attn=attn)
    ids = _ids(T, seed=T)
    ref = reference_importances(model, ids)
    # the reference's own parts add up to what the model's attention added and to the block's real output
    assert ref["decomposition_error"] < 1e-4
    _assert_close(flowray.edge_importances(model, ids), ref)


@pytest.mark.parametrize("case", NEW_CASES)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batches_match_the_reference(case, padding_side):
    model = _model(case, seed=5, attn="capture")
    seqs = [_ids(T, seed=T) for T in (6, 11, 1)]
    batch = flowray.edge_importances_batch(model, seqs, padding_side=padding_side)
    for ids, got in zip(seqs, batch):
        _assert_close(got, reference_importances(model, ids))


@pytest.mark.parametrize("case", NEW_CASES)
def test_capture_records_rebuild_the_real_blocks(case):
    """From the record alone: row_scale * alpha * v_j (W_O diag gamma)^h summed over heads and sources, plus
    the (scaled) output bias, is what the attention added to the residual; inputs and outputs are the
    model's own hidden states."""
    model = _model(case, seed=2, attn="capture")
    adapter = adapter_for(model)
    ids = _ids(9, seed=1)
    records = capture_all(model, adapter, ids)
    with capture.eager_attention(model), torch.no_grad():  # the attention the capture ran with
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    post_norm = adapter.post_attention(adapter.layers()[0]) is not None
    for rec in records:
        assert (rec.row_scale is not None) == post_norm
        w_o, b_o = adapter.output_projection(adapter.layers()[rec.layer])
        H = w_o.shape[0]
        v = rec.values[0].double().repeat_interleave(H // rec.values.shape[1], 0)  # [H, T, dh]
        F = torch.bmm(v, w_o.detach().double())  # [H, T, d]
        scale = torch.ones(ids.shape[1], dtype=torch.float64) if rec.row_scale is None else rec.row_scale[0].double()
        A = rec.probs[0].double() * scale[None, :, None]  # [H, pos, j]
        rebuilt = torch.einsum("hpj,hjd->pd", A, F)  # [T, d]
        if b_o is not None:
            rebuilt = rebuilt + scale[:, None] * b_o.detach().double()
        torch.testing.assert_close(rebuilt, rec.attn_out[0].double(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rec.inputs, hidden[rec.layer], atol=1e-5, rtol=1e-5)
        if rec.layer + 1 < len(records):  # the last hidden state has the final norm applied
            torch.testing.assert_close(rec.outputs, hidden[rec.layer + 1], atol=1e-5, rtol=1e-5)


def test_parts_of_post_norm_nodes_sum_to_one():
    imp = flowray.edge_importances(_model("gemma3", seed=1, attn="capture"), _ids(10, seed=2))
    np.testing.assert_allclose(imp.attn.sum(axis=(1, 3)) + imp.attn_residual, 1.0, atol=1e-5)
    np.testing.assert_allclose(imp.ffn + imp.ffn_residual, 1.0, atol=1e-5)


def test_capture_attention_soft_caps_like_gemma2_eager():
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    g = torch.Generator().manual_seed(0)
    module = torch.nn.Module().eval()
    module.num_key_value_groups = 2
    q = torch.randn(2, 4, 9, 6, generator=g) * 3  # [B, H, T, dh]; scores large enough for the cap to bite
    k, v = torch.randn(2, 2, 9, 6, generator=g) * 3, torch.randn(2, 2, 9, 6, generator=g)  # [B, H_kv, T, dh]
    future = ~torch.ones(9, 9, dtype=torch.bool).tril()
    mask = torch.zeros(2, 1, 9, 9).masked_fill_(future, torch.finfo(torch.float32).min)  # additive, as eager's
    want_out, want_probs = eager_attention_forward(module, q, k, v, mask, scaling=0.4, softcap=2.0)
    out, probs = capture._capture_attention(module, q, k, v, mask, scaling=0.4, softcap=2.0)
    torch.testing.assert_close(probs, want_probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    _, uncapped = capture._capture_attention(module, q, k, v, mask, scaling=0.4)
    assert float((uncapped - probs).abs().max()) > 0.05  # the cap matters at these scores


def test_every_new_family_is_registered():
    types = set(supported_model_types())
    assert {"gemma", "gemma2", "gemma3_text", "gemma3", "qwen3", "phi3", "olmo2", "olmo3", "gptj", "phi", "mixtral",
            "olmoe", "qwen2_moe", "qwen3_moe"} <= types
    assert adapter_for(tiny_model("gptj")).shape.parallel and adapter_for(tiny_model("phi2")).shape.parallel
    assert not adapter_for(tiny_model("olmo2")).shape.parallel


def test_unsupported_families_fail_fast_naming_the_type_and_the_supported_list(tmp_path):
    import transformers as tf

    mamba = tf.MambaForCausalLM(tf.MambaConfig(hidden_size=8, num_hidden_layers=1, vocab_size=11))
    named = r"'mamba' has no flowray adapter; supported families: .*gemma"
    with pytest.raises(UnsupportedArchitectureError, match=named):
        flowray.edge_importances(mamba, torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(UnsupportedArchitectureError, match=r"'t5' has no flowray adapter.*gptj \(gptj\)"):
        adapter_class_for(tf.T5Config())
    # a local directory with only a config: refused before any tokenizer or weight is looked for
    tf.MambaConfig(hidden_size=8, num_hidden_layers=1, vocab_size=11).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="'mamba'"):
        flowray.load_model(str(tmp_path), device="cpu")
    bidirectional = tf.Gemma3TextConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                                        hidden_size=8, vocab_size=11, use_bidirectional_attention=True)
    with pytest.raises(UnsupportedArchitectureError, match="use_bidirectional_attention=True"):
        adapter_class_for(bidirectional)


def _word_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<|endoftext|>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}  # id 1: the BOS the job prepends
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|endoftext|>")


@pytest.mark.parametrize("case", ["qwen3", "gemma2"])
def test_a_lora_adapter_directory_loads_merged(tmp_path, case):
    peft = pytest.importorskip("peft")
    base = tiny_model(case, seed=3)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "lora"
    base.save_pretrained(base_dir)
    _word_tokenizer().save_pretrained(base_dir)
    lora = peft.get_peft_model(
        tiny_model(case, seed=3),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                        init_lora_weights=False),  # random B: the adapter really changes the model
    )
    lora.save_pretrained(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base_dir)  # as a fine-tuner's adapter names its base
    cfg_path.write_text(json.dumps(cfg))
    merged = lora.merge_and_unload().eval()

    lm = flowray.load_model(str(adapter_dir), device="cpu")
    assert lm.adapter.family == adapter_for(base).family
    ids = lm.tokenizer("w5 w17 w3 w88 w41 w9 w2", return_tensors="pt").input_ids
    got = flowray.edge_importances(lm, ids)
    _assert_close(got, reference_importances(merged, ids))
    plain = flowray.edge_importances(base, ids)
    assert np.abs(got.attn - plain.attn).max() > 1e-3  # not the base model's importances
    assert flowray.models.loading.load_tokenizer(str(adapter_dir)).vocab_size == VOCAB


@torch.no_grad()
def _mixtral_expert_reference(model, ids):
    """float64, from Mixtral's weights: router softmax -> top-k renormalised -> each chosen expert's SwiGLU."""
    cfg = model.config
    seen = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.post_attention_layernorm.register_forward_hook(
            lambda m, a, o, i=i: seen.__setitem__(i, (a[0][0].double(), o[0].double()))))
        hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("out", i), o[0].double())))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    L, T, E = cfg.num_hidden_layers, ids.shape[1], cfg.num_local_experts
    experts, residual = np.zeros((L, T, E)), np.zeros((L, T))
    for l, layer in enumerate(model.model.layers):
        mid, xn = seen[l]  # [T, d] the attention node and its normed FFN input
        out = seen[("out", l)]
        w = model.model.layers[l].mlp
        probs = torch.softmax(xn @ w.gate.weight.double().T, -1)  # [T, E]
        top, idx = torch.topk(probs, cfg.num_experts_per_tok, -1)
        top = top / top.sum(-1, keepdim=True)
        parts = []
        for k in range(idx.shape[1]):
            gu = w.experts.gate_up_proj.double()[idx[:, k]]  # [T, 2I, d]
            g, u = torch.einsum("tid,td->ti", gu, xn).chunk(2, -1)
            h = torch.nn.functional.silu(g) * u  # [T, I]
            parts.append(top[:, k, None] * torch.einsum("tdi,ti->td", w.experts.down_proj.double()[idx[:, k]], h))
        assert float((mid + sum(parts) - out).abs().max()) < 1e-4  # the parts rebuild the real block output
        prox = [(out.abs().sum(-1) - (out - p).abs().sum(-1)).clamp_min(0) for p in [mid, *parts]]  # [T] each
        total = sum(prox)
        residual[l] = (prox[0] / total).numpy()
        for k in range(idx.shape[1]):
            experts[l, np.arange(T), idx[:, k].numpy()] = (prox[1 + k] / total).numpy()
    return experts, residual


def test_expert_importances_match_a_float64_reference():
    model = tiny_model("mixtral", seed=4, attn="sdpa")
    ids = _ids(11, seed=6)
    got = flowray.expert_importances(model, ids)
    experts, residual = _mixtral_expert_reference(model, ids)
    np.testing.assert_allclose(got.experts, experts, atol=TOL, rtol=0)
    np.testing.assert_allclose(got.residual, residual, atol=TOL, rtol=0)
    assert got.dense.max() < 1e-5  # Mixtral's FFN is all routed
    assert got.chosen.shape == (2, 11, 2) and np.all((got.experts > 0).sum(-1) <= 2)


@pytest.mark.parametrize("case", ["olmoe", "qwen2-moe", "qwen3-moe"])
def test_expert_importances_are_a_full_split_of_the_block_node(case):
    got = flowray.expert_importances(tiny_model(case, seed=2, attn="sdpa"), _ids(8, seed=1))
    total = got.experts.sum(-1) + got.dense + got.residual  # [L, T]: 1, or 0 where no part is close
    assert np.all((np.abs(total - 1) < 1e-5) | (total == 0)) and (total > 0).mean() > 0.5
    if case == "qwen2-moe":
        assert got.dense.max() > 0.01  # the gated shared expert is the non-routed part
    with pytest.raises(UnsupportedArchitectureError, match="has no routed experts"):
        flowray.expert_importances(tiny_model("qwen3"), _ids(4, seed=1))


@pytest.mark.parametrize("case", ["gemma2", "phi2", "olmo2"])
def test_torch_backend_matches_the_reference(case):
    """The vectorised torch kernel (the GPU path) with row-scaled probabilities and parallel blocks."""
    model = _model(case, seed=8, attn="capture")
    ids = _ids(12, seed=9)
    _assert_close(flowray.edge_importances(model, ids, backend="torch"), reference_importances(model, ids))


@pytest.mark.parametrize("case", ["gemma2", "gptj"])
def test_the_corpus_worker_runs_on_new_families(tmp_path, case):
    from flowray.pipeline.worker import FlowWorker

    tiny_model(case, seed=1).save_pretrained(tmp_path)
    _word_tokenizer().save_pretrained(tmp_path)
    from flowray.config import CorpusConfig, JobConfig

    config = JobConfig(corpora=(CorpusConfig(domain="d", source={"kind": "pydoc_topics"}),), model=str(tmp_path),
                       tau=(0.02,), max_tokens=12, batch_size=2, device="cpu")
    worker = FlowWorker(config)
    docs = [{"shard_id": "s", "doc_id": i, "domain": "d", "language": "en", "is_task": False, "text": text,
             "meta": "{}"} for i, text in (("a", "w1 w2 w3 w4 w5"), ("b", "w7 w8 w9"))]
    preds, errors = worker.process(docs)
    assert errors.num_rows == 0 and preds.num_rows == 8
    comps = np.stack(preds.column("component_importance").to_pylist())
    assert np.all((comps >= 0) & (comps <= 1 + 1e-6))
