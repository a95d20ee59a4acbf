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
    assert np.abs(a.attn - b.attn).max() < 0.1


@pytest.mark.slow
def test_gguf_file_loads(smollm2):
    lm = flowray.load_model(str(smollm2_gguf_path()), device="cpu")
    assert lm.adapter.family == "llama" and lm.adapter.shape.n_kv_heads == 3
    ids = lm.tokenizer("Hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        np.testing.assert_allclose(lm.model(ids).logits.numpy(), smollm2.model(ids).logits.numpy(), atol=1e-4)


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
