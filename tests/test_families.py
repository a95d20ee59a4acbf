"""The families of issue 13 (Gemma 2/3, Qwen3, Phi-3, OLMo-2, GPT-J, Phi-2, MoE FFNs) against the float64
materialising reference; the capture's records rebuild the model's real blocks; soft-capping; loading
PEFT/LoRA adapter directories; unsupported families fail fast."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import flowray
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
        capture.register_attention(capture.CAPTURE_IMPLEMENTATION, capture._capture_attention, "sdpa")
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
@pytest.mark.parametrize("T", [7, 13])
@pytest.mark.parametrize("attn", ["capture", "eager"])
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
    with torch.no_grad():
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
        torch.testing.assert_close(rec.inputs, hidden[rec.layer], atol=1e-5, rtol=1e-5)  # hidden: sdpa
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
    q, k, v = torch.randn(2, 4, 9, 6, generator=g) * 3, torch.randn(2, 2, 9, 6, generator=g) * 3, torch.randn(2, 2, 9, 6, generator=g)
    mask = torch.zeros(2, 1, 9, 9).masked_fill_(~torch.ones(9, 9, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)
    want_out, want_probs = eager_attention_forward(module, q, k, v, mask, scaling=0.4, softcap=2.0)
    out, probs = capture._capture_attention(module, q, k, v, mask, scaling=0.4, softcap=2.0)
    torch.testing.assert_close(probs, want_probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    _, uncapped = capture._capture_attention(module, q, k, v, mask, scaling=0.4)
    assert float((uncapped - probs).abs().max()) > 0.05  # the cap matters at these scores


def test_every_new_family_is_registered():
    types = set(supported_model_types())
    assert {"gemma2", "gemma3_text", "qwen3", "phi3", "olmo2", "gptj", "phi", "mixtral", "olmoe", "qwen2_moe",
            "qwen3_moe"} <= types
    assert adapter_for(tiny_model("gptj")).shape.parallel and adapter_for(tiny_model("phi2")).shape.parallel
    assert not adapter_for(tiny_model("olmo2")).shape.parallel


def test_unsupported_families_fail_fast_naming_the_type_and_the_supported_list(tmp_path):
    import transformers as tf

    mamba = tf.MambaForCausalLM(tf.MambaConfig(hidden_size=8, num_hidden_layers=1, vocab_size=11))
    with pytest.raises(UnsupportedArchitectureError, match=r"'mamba' has no flowray adapter; supported families: .*gemma"):
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

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


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
