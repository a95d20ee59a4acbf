"""Model loading: alias, local directory, GGUF file; dtype/device options; clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flowray
from flowray.errors import InputError, UnknownModelError
from flowray.models.loading import smollm2_gguf_path


@pytest.mark.slow
def test_local_directory_in_bfloat16_keeps_the_maths_in_float32(tiny_model_dir):
    lm32 = flowray.load_model(str(tiny_model_dir), device="cpu")
    lm16 = flowray.load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    assert next(lm16.model.parameters()).dtype == torch.bfloat16
    ids = lm32.tokenizer("one two three four five", return_tensors="pt").input_ids
    a, b = flowray.edge_importances(lm32, ids), flowray.edge_importances(lm16, ids)
    assert b.attn.dtype == np.float32
    # bf16 activations differ from fp32 ones, but the result is still a proper set of importances
    np.testing.assert_allclose(b.attn.sum(axis=(1, 3)) + b.attn_residual, 1.0, atol=1e-5)
    # bf16 rounding moves importances by ~4e-4 here; a wrong result (two heads swapped, a layer's heads
    # shuffled) moves them by about the size of the importances themselves (largest ~0.085)
    diff = np.abs(a.attn - b.attn).max()
    assert diff < 3e-3 < np.abs(a.attn - a.attn[:, [1, 0, 2]]).max()


@pytest.mark.slow
def test_gguf_file_loads(smollm2):
    lm = flowray.load_model(str(smollm2_gguf_path()), device="cpu")
    assert lm.adapter.family == "llama" and lm.adapter.shape.n_kv_heads == 3
    ids = lm.tokenizer("Hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        np.testing.assert_allclose(lm.model(ids).logits.numpy(), smollm2.model(ids).logits.numpy(), atol=1e-4)


def test_a_truncated_gguf_file_is_named_without_an_internet_hint(tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf_path(), "rb") as fh:
        cut.write_bytes(fh.read(1_000_000))
    with pytest.raises(UnknownModelError, match=r"could not read the GGUF file .*cut.gguf' \(1000000 bytes\)"
                       r".*truncated or corrupt") as info:
        flowray.load_model(str(cut))
    assert "internet" not in str(info.value)


def test_a_hub_id_that_cannot_be_reached_fails_fast(monkeypatch):
    import time

    from huggingface_hub import constants

    for offline in (True, False):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        if not offline:  # an endpoint nothing listens on: as unreachable as the hub without internet
            monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
        t0 = time.perf_counter()
        with pytest.raises(UnknownModelError, match="not in the local Hugging Face cache, and "
                           + ("HF_HUB_OFFLINE is set" if offline else "the hub .* cannot be reached")):
            flowray.load_model("nonexistent-org/nonexistent-model")
        assert time.perf_counter() - t0 < 5, "no hub retries"


def test_a_corrupt_converted_cache_is_detected_and_rebuilt(tmp_path, monkeypatch, tiny_model_dir):
    """The smollm2 alias converts the GGUF once into a cache; here "conversion" loads the tiny model."""
    import transformers

    from flowray.models import loading

    monkeypatch.setenv("FLOWRAY_CACHE", str(tmp_path))
    real_tok, real_model = transformers.AutoTokenizer.from_pretrained, transformers.AutoModelForCausalLM.from_pretrained
    conversions = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: real_tok(tiny_model_dir))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: conversions.append(1) or real_model(tiny_model_dir))
    target = loading._smollm2_local_dir()
    weights = target / "model.safetensors"
    good = weights.read_bytes()
    assert len(conversions) == 1 and (target / "flowray-checksums.json").is_file()
    assert loading._smollm2_local_dir() == target and len(conversions) == 1  # verified, reused

    def damaged(data: bytes):
        weights.write_bytes(data)
        assert loading._cache_problem(target) is not None
        assert loading._smollm2_local_dir() == target
        assert weights.read_bytes() == good and loading._cache_problem(target) is None

    damaged(good[: len(good) // 2])  # half the file, as a full disk or a killed copy leaves it
    flipped = bytearray(good)
    flipped[-10] ^= 0xFF
    damaged(bytes(flipped))  # same size, one weight changed: only the checksum sees it
    assert len(conversions) == 3
    (target / "flowray-checksums.json").unlink()  # a cache from before checksums, whole: adopted, not rebuilt
    assert loading._smollm2_local_dir() == target and len(conversions) == 3
    assert (target / "flowray-checksums.json").is_file()
    (target / "flowray-checksums.json").unlink()
    damaged(good[:-100])  # ... and not whole: rebuilt
    assert len(conversions) == 4


def test_bad_specs_and_options(tmp_path):
    with pytest.raises(UnknownModelError, match="no config.json"):
        flowray.load_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UnknownModelError, match="not a .gguf file"):
        flowray.load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(UnknownModelError, match="does not exist"):
        flowray.load_model("./nowhere/model.gguf")
    with pytest.raises(InputError, match="dtype must be one of"):
        flowray.load_model("smollm2", dtype="float64")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            flowray.load_model("smollm2", device="cuda")
