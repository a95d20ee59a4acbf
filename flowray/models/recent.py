"""Adapters for the newer families: what each needs beyond the Llama / GPT-NeoX layouts.

- Gemma 2 / Gemma 3 (text) and OLMo-2 normalise the attention output before the residual add,
  ``y = x + RMSNorm_post(attn_out)``. With the forward's own ``r_pos`` (the RMS of the summed attention
  output at each query position) the norm is linear, so every sub-edge is ``gamma * alpha f(x_j) / r_pos``
  and the parts still add up to the node: ``output_projection`` returns ``W_O diag(gamma)`` (Gemma's
  ``(1 + weight)`` convention, OLMo-2's ``weight``) and the capture's ``row_scale`` is ``1 / r_pos``.
  The post-FFN norm needs nothing: the FFN part is one edge whatever it holds.
- Soft-capped attention logits (Gemma 2), q/k norms (Gemma 3, Qwen3, OLMo-2, OLMoE, Phi-2's qk_layernorm),
  sliding-window layers and partial rotary (GPT-J, Phi-2, Phi-3) only change alpha, which the capture reads.
- Phi-3 fuses q, k and v into one ``qkv_proj``; the value vectors are its last ``H_kv * d_head`` outputs.
- GPT-J and Phi-2 run attention and MLP in parallel on one LayerNorm: one node per layer, as GPT-NeoX.
- OLMoE clips q, k and v to ``[-clip_qkv, clip_qkv]`` after the projections: the values are clipped too.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from flowray.errors import UnsupportedArchitectureError
from flowray.models.base import Adapter, ModelShape, SelfAttentionWithVProj, linear_value_weight, refuse
from flowray.models.classic import LlamaAdapter


class _PostAttentionNorm:
    """Blocks ``y = x + RMSNorm_post(attn_out)``: the norm is ``post_attention_layernorm``."""

    def post_attention(self, layer):
        return layer.post_attention_layernorm

    def ffn_module(self, layer):
        return layer.post_feedforward_layernorm  # its output is what the FFN adds to the residual

    def norm_gain(self, norm: nn.Module) -> torch.Tensor:
        """``gamma`` ``[d]`` of the post-attention norm (float32)."""
        return norm.weight.float()

    def output_projection(self, layer):
        # W_O diag(gamma) per head [H, dh, d], and the bias gamma * b_O; the consumer scales alpha's rows
        # by row_scale = 1 / r_pos, which turns each sub-edge into gamma * alpha f(x_j) / r_pos
        w, b = super().output_projection(layer)
        gain = self.norm_gain(self.post_attention(layer))  # [d]
        return w.float() * gain, None if b is None else b.float() * gain


def _check_heads(config, problems: list[str]) -> None:
    n_heads, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    if n_kv is not None and n_heads % n_kv:
        problems.append(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")


class GemmaAdapter(_PostAttentionNorm, LlamaAdapter):
    """Gemma 2 and Gemma 3 (text): post-attention RMSNorm with ``(1 + weight)``, soft-capped logits
    (Gemma 2), q/k norms (Gemma 3), alternating sliding-window layers, embeddings scaled by sqrt(d)
    (inside ``embed_tokens``, so already in the first block's input)."""

    family = "gemma"
    model_types = ("gemma2", "gemma3_text")

    @classmethod
    def check_config(cls, config) -> None:
        problems: list[str] = []
        _check_heads(config, problems)
        if getattr(config, "use_bidirectional_attention", False):
            problems.append("use_bidirectional_attention=True (flowray's routes are for causal LMs)")
        refuse(cls.family, problems)

    def norm_gain(self, norm):
        return 1.0 + norm.weight.float()  # Gemma's RMSNorm scales by (1 + weight)


class Gemma3MultimodalAdapter(GemmaAdapter):
    """Gemma 3 image-text checkpoints (``gemma3``, 4B and up) on text: the language model inside
    ``Gemma3ForConditionalGeneration`` is Gemma 3 text; its config is ``config.text_config``."""

    model_types = ("gemma3",)

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config.text_config)

    @classmethod
    def read_shape(cls, config) -> ModelShape:
        return super().read_shape(config.text_config)

    def layers(self):
        return list(self.model.model.language_model.layers)

    def final_norm(self):
        return self.model.model.language_model.norm


class Olmo2Adapter(_PostAttentionNorm, LlamaAdapter):
    """OLMo-2 and OLMo-3: no norm before attention or MLP; RMSNorms after both, q/k norms over all heads
    (OLMo-3 adds sliding-window layers)."""

    family = "olmo2"
    model_types = ("olmo2", "olmo3")

    @classmethod
    def check_config(cls, config) -> None:
        problems: list[str] = []
        _check_heads(config, problems)
        refuse(cls.family, problems)

    def attention_norm(self, layer):
        raise UnsupportedArchitectureError(
            "olmo2: the attention reads the residual stream directly (there is no pre-attention norm to "
            "fold into W_OV); use W_V W_O as it is"
        )


class Phi3Adapter(LlamaAdapter):
    """Phi-3 / Phi-3.5 / Phi-4-mini: Llama layout with fused ``qkv_proj`` (and ``gate_up_proj``)."""

    family = "phi3"
    model_types = ("phi3",)

    def value_module(self, layer):
        return layer.self_attn.qkv_proj

    def values_from(self, output):
        B, T, _ = output.shape
        s = self.shape
        start = (s.n_heads + s.n_kv_heads) * s.head_dim  # qkv_proj emits [q (H dh) | k (H_kv dh) | v (H_kv dh)]
        return output[..., start:].reshape(B, T, s.n_kv_heads, s.head_dim)

    def value_weight(self, layer):
        s = self.shape
        lin = layer.self_attn.qkv_proj  # weight [(H + 2 H_kv) dh, d]
        start = (s.n_heads + s.n_kv_heads) * s.head_dim
        w = lin.weight[start:].T.reshape(s.d_model, s.n_kv_heads, s.head_dim).permute(1, 0, 2)  # [H_kv, d, dh]
        b = None if lin.bias is None else lin.bias[start:].view(s.n_kv_heads, s.head_dim)
        return w, b


class OlmoeAdapter(LlamaAdapter):
    """OLMoE: Llama layout, q/k norms over all heads, optional q/k/v clipping, MoE FFN (one edge)."""

    family = "olmoe"
    model_types = ("olmoe",)

    @classmethod
    def check_config(cls, config) -> None:
        problems: list[str] = []
        _check_heads(config, problems)
        refuse(cls.family, problems)

    def values_from(self, output):
        values = super().values_from(output)
        clip = getattr(self.config, "clip_qkv", None)
        return values if clip is None else values.clamp(-clip, clip)  # the attention clips v_proj's output


class GPTJAdapter(Adapter):
    """GPT-J: one LayerNorm feeding attention and MLP in parallel, partial rotary, no attention biases."""

    family = "gptj"
    model_types = ("gptj",)

    @classmethod
    def read_shape(cls, config) -> ModelShape:
        return ModelShape(
            n_layers=config.n_layer,
            n_heads=config.n_head,
            n_kv_heads=config.n_head,
            head_dim=config.n_embd // config.n_head,
            d_model=config.n_embd,
            parallel=True,
            max_positions=cls._max_positions(config, "n_positions", "max_position_embeddings"),
        )

    def layers(self):
        return list(self.model.transformer.h)

    def attention(self, layer):
        return layer.attn

    def value_module(self, layer):
        return layer.attn.v_proj

    def head_output_module(self, layer):
        return layer.attn.out_proj

    def ffn_module(self, layer):
        return layer.mlp

    def value_weight(self, layer):
        return linear_value_weight(layer.attn.v_proj, self.shape.n_kv_heads, self.shape.head_dim)

    def attention_norm(self, layer):
        return layer.ln_1

    def final_norm(self):
        return self.model.transformer.ln_f


class PhiAdapter(SelfAttentionWithVProj, Adapter):
    """Phi-1 / Phi-1.5 / Phi-2: parallel attention + MLP on one LayerNorm, partial rotary, biases."""

    family = "phi"
    model_types = ("phi",)

    @classmethod
    def check_config(cls, config) -> None:
        problems: list[str] = []
        _check_heads(config, problems)
        refuse(cls.family, problems)

    @classmethod
    def read_shape(cls, config) -> ModelShape:
        return dataclasses.replace(LlamaAdapter.read_shape(config), parallel=True)

    def layers(self):
        return list(self.model.model.layers)

    def head_output_module(self, layer):
        return layer.self_attn.dense

    def ffn_module(self, layer):
        return layer.mlp

    def attention_norm(self, layer):
        return layer.input_layernorm

    def final_norm(self):
        return self.model.model.final_layernorm


RECENT_FAMILIES: tuple[type[Adapter], ...] = (
    GemmaAdapter, Gemma3MultimodalAdapter, Olmo2Adapter, Phi3Adapter, OlmoeAdapter, GPTJAdapter, PhiAdapter,
)
