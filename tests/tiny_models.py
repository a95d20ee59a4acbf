"""Tiny random models of every supported family, built from configs (no download), at odd sizes."""

from __future__ import annotations

import torch

VOCAB = 97


def _randomise(model: torch.nn.Module, seed: int, with_bias: bool) -> torch.nn.Module:
    """HF init gives near-uniform attention and zero biases; random weights exercise every term."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and not with_bias:
                p.zero_()
                continue
            std = 0.6 if "norm" in name or "ln" in name else 0.35
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if ("norm" in name or "ln" in name) and name.endswith("weight") else 0.0))
    return model.eval()


def tiny_model(case: str, seed: int = 0, attn: str = "eager") -> torch.nn.Module:
    """One of CASES: a small random causal LM. ``attn`` is its attention implementation: with "eager"
    flowray captures through transformers' eager attention, with anything else through its own."""
    import transformers as tf

    common = dict(vocab_size=VOCAB)
    if case == "gpt2":
        cfg = tf.GPT2Config(n_layer=3, n_head=3, n_embd=21, n_positions=64, n_inner=29, **common)
        bias = True
    elif case == "opt":
        cfg = tf.OPTConfig(num_hidden_layers=2, num_attention_heads=3, hidden_size=21, ffn_dim=31,
                           max_position_embeddings=64, word_embed_proj_dim=21, enable_bias=True, **common)
        bias = True
    elif case == "opt-nobias":
        cfg = tf.OPTConfig(num_hidden_layers=2, num_attention_heads=3, hidden_size=21, ffn_dim=31,
                           max_position_embeddings=64, word_embed_proj_dim=21, enable_bias=False, **common)
        bias = False
    elif case == "llama-gqa":
        cfg = tf.LlamaConfig(num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=6,
                             hidden_size=30, intermediate_size=33, max_position_embeddings=64, **common)
        bias = False
    elif case == "llama-bias":
        cfg = tf.LlamaConfig(num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3, head_dim=8,
                             hidden_size=21, intermediate_size=19, attention_bias=True, mlp_bias=True,
                             max_position_embeddings=64, **common)
        bias = True
    elif case == "mistral":
        cfg = tf.MistralConfig(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=4,
                               hidden_size=24, intermediate_size=27, sliding_window=5,
                               max_position_embeddings=64, **common)
        bias = False
    elif case == "qwen2":
        cfg = tf.Qwen2Config(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
                             hidden_size=36, intermediate_size=23, max_position_embeddings=64, **common)
        bias = True  # Qwen2 has q/k/v biases and no o_proj bias
    elif case == "neox-parallel":
        cfg = tf.GPTNeoXConfig(num_hidden_layers=3, num_attention_heads=3, hidden_size=24, intermediate_size=35,
                               rotary_pct=0.5, use_parallel_residual=True, max_position_embeddings=64, **common)
        bias = True
    elif case == "neox-sequential":
        cfg = tf.GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=3, hidden_size=24, intermediate_size=35,
                               use_parallel_residual=False, attention_bias=False, max_position_embeddings=64, **common)
        bias = False
    else:
        raise KeyError(case)
    cfg._attn_implementation = attn
    model = tf.AutoModelForCausalLM.from_config(cfg)
    return _randomise(model, seed, bias)


CASES = ["gpt2", "opt", "opt-nobias", "llama-gqa", "llama-bias", "mistral", "qwen2", "neox-parallel",
         "neox-sequential"]
