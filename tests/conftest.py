"""Shared fixtures: tiny random models, the packaged SmolLM2 (loaded once), shared data location."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# Without a GPU the Triton programs run under Triton's interpreter (numpy, one program at a time), so the
# suite checks what they compute on every machine; set before anything imports them.
if os.environ.get("FLOWRAY_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

def _shared_data() -> Path:
    """$FLOWRAY_SHARED_DATA, else a shared/data folder above the checkout (../shared/data here)."""
    from flowray.config import find_shared_data

    return find_shared_data() or Path(os.environ.get("FLOWRAY_SHARED_DATA", REPO.parent / "shared" / "data"))


SHARED_DATA = _shared_data()
sys.path.insert(0, str(TESTS))  # tiny_models, reference

needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(),
    reason=f"needs the project's shared data folder (C4, FLORES-200 and code samples), not found at {SHARED_DATA}; "
    "set FLOWRAY_SHARED_DATA=/path/to/shared/data")

needs_shared_nltk = pytest.mark.skipif(
    not (SHARED_DATA / "nltk_data").is_dir(),
    reason=f"compares flowray's packaged tagger with NLTK's own data on C4 text, from the project's shared data "
    f"folder, not found at {SHARED_DATA}; set FLOWRAY_SHARED_DATA=/path/to/shared/data")

IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="session")
def smollm2():
    import flowray

    return flowray.load_model("smollm2", device="cpu")


def save_tiny_llama(path, tokenizer, context: int):
    """A tiny random Llama (seed 0) with ``tokenizer``, saved as a local HF directory of ``context`` positions."""
    import torch
    import transformers as tf

    cfg = tf.LlamaConfig(num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, head_dim=8,
                         hidden_size=24, intermediate_size=32, vocab_size=len(tokenizer),
                         max_position_embeddings=context)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2):
    """A tiny random Llama saved as a local HF directory with SmolLM2's tokenizer (context 24 tokens)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2.tokenizer, 24)
