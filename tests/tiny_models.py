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
    elif case in NEW_CASES:
        cfg, bias = _recent_config(case)
    else:
        raise KeyError(case)
    cfg._attn_implementation = attn
    if case in MOE_CASES:
        # transformers' default grouped_mm experts need 16-byte strides, which odd tiny sizes do not have
        cfg._experts_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg)
    return _randomise(model, seed, bias)


CASES = ["gpt2", "opt", "opt-nobias", "llama-gqa", "llama-bias", "mistral", "qwen2", "neox-parallel",
         "neox-sequential"]


# the families of issue 13: odd sizes; sliding windows short enough to bite at the tests' lengths
NEW_CASES = ["gemma", "gemma2", "gemma3", "gemma3-mm", "qwen3", "phi3", "olmo2", "olmo3", "gptj", "phi2", "mixtral",
             "olmoe", "qwen2-moe", "qwen3-moe"]
MOE_CASES = ("mixtral", "olmoe", "qwen2-moe", "qwen3-moe")


def _recent_config(case: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if case == "gemma":  # Gemma 1: Llama's block with (1 + weight) pre-norms and sqrt(d)-scaled embeddings
        return tf.GemmaConfig(num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=1, head_dim=6,
                              hidden_size=35, intermediate_size=23, **common), False
    if case == "gemma2":  # soft-capped logits (3.0 bites at these scores), post-attention norm, window 4
        return tf.Gemma2Config(num_hidden_layers=3, num_attention_heads=5, num_key_value_heads=1, head_dim=6,
                               hidden_size=35, intermediate_size=23, query_pre_attn_scalar=5,
                               attn_logit_softcapping=3.0, final_logit_softcapping=5.0, sliding_window=4,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                               **common), False
    if case == "gemma3":  # q/k norms, post-attention norm, window 3, attention biases
        return tf.Gemma3TextConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=6,
                                   hidden_size=28, intermediate_size=19, query_pre_attn_scalar=7,
                                   sliding_window=3, attention_bias=True,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                   **common), True
    if case == "gemma3-mm":  # an image-text Gemma 3 (Gemma3ForConditionalGeneration) read on text
        text = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=6, hidden_size=28,
                    intermediate_size=19, query_pre_attn_scalar=7, sliding_window=3,
                    layer_types=["sliding_attention", "full_attention"], **common)
        vision = dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)
        return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=96,
                               boi_token_index=94, eoi_token_index=95), False
    if case == "qwen3":
        return tf.Qwen3Config(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3, head_dim=6,
                              hidden_size=33, intermediate_size=19, **common), False
    if case == "phi3":  # fused qkv_proj and gate_up_proj, partial rotary
        return tf.Phi3Config(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, hidden_size=30,
                             intermediate_size=19, partial_rotary_factor=0.6, **common), False
    if case == "olmo2":  # no pre-norms, post-attention and post-FFN norms, q/k norms over all heads
        return tf.Olmo2Config(num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=1, hidden_size=30,
                              intermediate_size=19, **common), False
    if case == "olmo3":  # OLMo-2's block with sliding-window layers (window 4)
        return tf.Olmo3Config(num_hidden_layers=3, num_attention_heads=5, num_key_value_heads=1, hidden_size=30,
                              intermediate_size=19, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              **common), False
    if case == "gptj":  # parallel attention + MLP on one LayerNorm, rotary on 4 of 9 dims
        return tf.GPTJConfig(n_layer=2, n_head=3, n_embd=27, n_inner=31, rotary_dim=4, n_positions=64,
                             vocab_size=VOCAB, bos_token_id=1, eos_token_id=2), True
    if case == "phi2":  # parallel, partial rotary, biases, q/k LayerNorms
        return tf.PhiConfig(num_hidden_layers=2, num_attention_heads=3, hidden_size=27, intermediate_size=31,
                            partial_rotary_factor=0.5, qk_layernorm=True, **common), True
    if case == "mixtral":
        return tf.MixtralConfig(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=6,
                                hidden_size=33, intermediate_size=13, num_local_experts=3, num_experts_per_tok=2,
                                **common), False
    if case == "olmoe":  # q/k norms and q/k/v clipping at 0.9
        return tf.OlmoeConfig(num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, hidden_size=30,
                              intermediate_size=13, num_experts=4, num_experts_per_tok=2, clip_qkv=0.9,
                              **common), False
    if case == "qwen2-moe":  # a shared expert beside the routed ones; q/k/v biases
        return tf.Qwen2MoeConfig(num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=1, hidden_size=30,
                                 intermediate_size=17, moe_intermediate_size=11, shared_expert_intermediate_size=13,
                                 num_experts=3, num_experts_per_tok=2, **common), True
    if case == "qwen3-moe":
        return tf.Qwen3MoeConfig(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=6,
                                 hidden_size=31, intermediate_size=17, moe_intermediate_size=11, num_experts=3,
                                 num_experts_per_tok=2, **common), False
    raise KeyError(case)
