"""Adapters of the first families: the Llama layout (and its kin), GPT-2, OPT and GPT-NeoX.

The newer families in ``flowray.models.recent`` build on these; ``flowray.models.families`` lists them all.
"""

from __future__ import annotations

from flowray.errors import UnsupportedArchitectureError
from flowray.models.base import Adapter, SelfAttentionWithVProj, refuse


class LlamaAdapter(SelfAttentionWithVProj, Adapter):
    """Llama 2/3, Mistral, Qwen2, SmolLM2: pre-RMSNorm, rotary, grouped-query attention.

    Also Gemma 1 (pre-norms only, with ``(1 + weight)`` gains), Qwen3 (q/k norms: they only change alpha)
    and the MoE FFNs of Mixtral, Qwen2-MoE and Qwen3-MoE (the FFN part is the router-weighted sum of the
    chosen experts: one edge, ``out - mid``).
    """

    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "gemma", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")

    @classmethod
    def check_config(cls, config) -> None:
        problems = []
        if getattr(config, "attn_logit_softcapping", None):
            problems.append(f"attn_logit_softcapping={config.attn_logit_softcapping!r} is not supported")
        n_heads, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
        if n_kv is not None and n_heads % n_kv:
            problems.append(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
        refuse(cls.family, problems)

    def layers(self):
        return list(self.model.model.layers)

    def head_output_module(self, layer):
        return layer.self_attn.o_proj

    def ffn_module(self, layer):
        return layer.mlp

    def experts_module(self, layer):
        return getattr(layer.mlp, "experts", None)  # MoE blocks (Mixtral, OLMoE, Qwen-MoE) hold `experts`

    def attention_norm(self, layer):
        return layer.input_layernorm

    def final_norm(self):
        return self.model.model.norm


class GPT2Adapter(Adapter):
    """GPT-2: pre-LayerNorm, fused Conv1D qkv, biases everywhere."""

    family = "gpt2"
    model_types = ("gpt2",)

    @classmethod
    def check_config(cls, config) -> None:
        problems = []
        if getattr(config, "add_cross_attention", False):
            problems.append("add_cross_attention=True (cross-attention blocks are not part of the route graph)")
        refuse(cls.family, problems)

    def layers(self):
        return list(self.model.transformer.h)

    def attention(self, layer):
        return layer.attn

    def value_module(self, layer):
        return layer.attn.c_attn

    def values_from(self, output):
        B, T, _ = output.shape
        d = self.shape.d_model
        # c_attn emits [q | k | v] along the last dim, each [H * dh]
        return output[..., 2 * d : 3 * d].reshape(B, T, self.shape.n_heads, self.shape.head_dim)

    def head_output_module(self, layer):
        return layer.attn.c_proj

    def eager_attention_function(self, layer):
        if getattr(self.config, "reorder_and_upcast_attn", False):
            # GPT-2 runs its own upcast path only when the implementation is literally "eager"; under any
            # other name (the knockout's) it would silently compute attention differently
            raise UnsupportedArchitectureError(
                "gpt2: reorder_and_upcast_attn=True is not supported by attention knockout; load the model "
                "with reorder_and_upcast_attn=False"
            )
        return super().eager_attention_function(layer)

    def output_projection(self, layer):
        s = self.shape
        conv = layer.attn.c_proj  # Conv1D stores [in = H*dh, out = d]: y = x @ W + b
        return conv.weight.reshape(s.n_heads, s.head_dim, s.d_model), conv.bias

    def value_weight(self, layer):
        s = self.shape
        conv = layer.attn.c_attn  # [d, 3d]
        w = conv.weight[:, 2 * s.d_model :].reshape(s.d_model, s.n_heads, s.head_dim).permute(1, 0, 2)
        b = conv.bias[2 * s.d_model :].view(s.n_heads, s.head_dim)
        return w, b

    def attention_norm(self, layer):
        return layer.ln_1

    def final_norm(self):
        return self.model.transformer.ln_f


class OPTAdapter(SelfAttentionWithVProj, Adapter):
    """OPT with pre-LayerNorm (125m, 1.3b and larger; not the post-LN 350m)."""

    family = "opt"
    model_types = ("opt",)

    @classmethod
    def check_config(cls, config) -> None:
        problems = []
        if not getattr(config, "do_layer_norm_before", True):
            problems.append(
                "do_layer_norm_before=False (post-LayerNorm, e.g. opt-350m): the residual stream is "
                "renormalised after every block, so a node is not a sum of its edges"
            )
        refuse(cls.family, problems)

    def layers(self):
        return list(self.model.model.decoder.layers)

    def head_output_module(self, layer):
        return layer.self_attn.out_proj

    def attention_norm(self, layer):
        return layer.self_attn_layer_norm

    def final_norm(self):
        return self.model.model.decoder.final_layer_norm

    def unembedding(self):
        # opt-350m-style project_out maps d_model -> word_embed_proj_dim before the tied unembedding
        w = self.model.get_output_embeddings().weight  # [V, d_proj]
        proj = getattr(self.model.model.decoder, "project_out", None)
        if proj is not None:
            w = w @ proj.weight  # [V, d_proj] @ [d_proj, d] -> [V, d]
        return w


class GPTNeoXAdapter(Adapter):
    """GPT-NeoX / Pythia: fused per-head qkv, parallel attention + MLP when use_parallel_residual."""

    family = "gpt_neox"
    model_types = ("gpt_neox",)

    @classmethod
    def parallel_blocks(cls, config) -> bool:
        return bool(getattr(config, "use_parallel_residual", True))

    def layers(self):
        return list(self.model.gpt_neox.layers)

    def attention(self, layer):
        return layer.attention

    def value_module(self, layer):
        return layer.attention.query_key_value

    def values_from(self, output):
        B, T, _ = output.shape
        s = self.shape
        # query_key_value is laid out per head: [H, (q | k | v) * dh]
        return output.view(B, T, s.n_heads, 3 * s.head_dim)[..., 2 * s.head_dim :]

    def head_output_module(self, layer):
        return layer.attention.dense

    def value_weight(self, layer):
        s = self.shape
        lin = layer.attention.query_key_value  # weight [H * 3 * dh, d]
        w = lin.weight.view(s.n_heads, 3, s.head_dim, s.d_model)[:, 2].transpose(1, 2)  # [H, d, dh]
        b = None if lin.bias is None else lin.bias.view(s.n_heads, 3, s.head_dim)[:, 2]
        return w, b

    def attention_norm(self, layer):
        return layer.input_layernorm

    def final_norm(self):
        return self.model.gpt_neox.final_layer_norm
