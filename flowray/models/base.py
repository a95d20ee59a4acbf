"""The adapter contract: the only place (with its subclasses) that knows HF module names.

An adapter maps flowray's canonical pieces onto a HF causal LM:

- ``layers()``: the decoder blocks, bottom to top;
- ``attention(layer)``: the self-attention module; under eager attention it returns
  ``(attn_output, attn_weights)`` with ``attn_output`` already projected by W_O (incl. its bias);
- ``value_module(layer)`` + ``values_from(output)``: where the per-head value vectors
  (after the block's own norm, including the value bias) come out;
- ``output_projection(layer)``: W_O split per head, ``[H, d_head, d_model]``, and its bias;
- ``head_output_module(layer)``: the module whose *input* is the concatenation of the heads' outputs
  (W_O itself), used by the interventions in ``flowray.baselines``;
- ``shape.parallel``: GPT-NeoX style ``x + attn(ln1(x)) + mlp(ln2(x))`` blocks;
- ``post_attention(layer)``: the norm between the attention output and the residual add, for blocks
  ``y = x + RMSNorm_post(attn_out)`` (Gemma 2/3, OLMo-2), else None. Such a norm is linear in its input
  once its per-position normaliser ``r_pos`` is fixed at the forward pass's own value, so each sub-edge is
  ``gamma * alpha f(x_j) / r_pos`` exactly: ``output_projection`` folds ``gamma`` into W_O, and
  ``post_attention_scale`` gives ``1 / r_pos`` (the capture's ``row_scale``, which scales alpha's rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from flowray.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ModelShape:
    """The dimensions the importance maths needs, read from the HF config."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    parallel: bool  # one node per layer (attention and FFN read the same input)
    max_positions: int | None  # None: no hard limit known

    @property
    def kv_group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads


class Adapter:
    """Base class; subclasses set ``family``/``model_types`` and implement the module lookups."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.check_config(self.config)
        self.shape = self.read_shape(self.config)
        n_layers = len(self.layers())
        if n_layers != self.shape.n_layers:
            raise UnsupportedArchitectureError(
                f"{self.family}: config says {self.shape.n_layers} layers but the model has {n_layers} "
                "decoder blocks; flowray cannot tell which blocks belong to the residual stream"
            )

    # --- config ----------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, config) -> None:
        """Raise UnsupportedArchitectureError for config settings this adapter cannot decompose."""

    @classmethod
    def read_shape(cls, config) -> ModelShape:
        """The dimensions under HF's standard config names; configs with names of their own (GPT-2's ``n_layer``,
        ``n_head``, ``n_embd``, ``n_positions``) map them onto these through ``attribute_map``. Families whose
        configs differ further override this."""
        n_heads = config.num_attention_heads
        return ModelShape(
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_heads,
            d_model=config.hidden_size,
            parallel=cls.parallel_blocks(config),
            max_positions=cls._max_positions(config, "max_position_embeddings"),
        )

    @classmethod
    def parallel_blocks(cls, config) -> bool:
        """GPT-NeoX style ``x + attn(ln1(x)) + mlp(ln2(x))`` blocks (one node per layer)? Default: sequential."""
        return False

    # --- modules ---------------------------------------------------------------------------------
    def layers(self) -> list[nn.Module]:  # pragma: no cover - abstract
        raise NotImplementedError

    def attention(self, layer: nn.Module) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def value_module(self, layer: nn.Module) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def values_from(self, output: torch.Tensor) -> torch.Tensor:
        """Value vectors from ``value_module``'s output ``[B, T, *]`` -> ``[B, T, H_kv, d_head]``."""
        B, T, _ = output.shape
        return output.view(B, T, self.shape.n_kv_heads, self.shape.head_dim)

    def head_output_module(self, layer: nn.Module) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def output_projection(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W_O per head ``[H, d_head, d_model]`` and its bias ``[d_model]`` (or None)."""
        lin = self.head_output_module(layer)
        s = self.shape
        # nn.Linear stores [d_model, H * d_head]; x @ W.T, so per head rows of W.T
        w = lin.weight.T.reshape(s.n_heads, s.head_dim, s.d_model)  # [H, dh, d]
        return w, lin.bias

    def eager_attention_function(self, layer: nn.Module):
        """The model's own eager attention function for ``layer`` (used by ``flowray.baselines``' knockout).

        transformers defines ``eager_attention_forward(module, query, key, value, attention_mask, **kw)`` in the
        modeling file of every attention class that dispatches through ``AttentionInterface``; it returns
        ``(attn_output [B, T, H, dh], attn_weights [B, H, T, T])`` with the post-softmax weights it used.
        """
        import sys

        attention = self.attention(layer)
        module = sys.modules.get(type(attention).__module__)
        fn = getattr(module, "eager_attention_forward", None)
        if fn is None:
            raise UnsupportedArchitectureError(
                f"{self.family}: {type(attention).__module__} defines no eager_attention_forward, so flowray "
                "cannot intervene on its attention weights (attention knockout needs transformers>=4.48 "
                "attention modules that dispatch through AttentionInterface)"
            )
        return fn

    def post_attention(self, layer: nn.Module) -> nn.Module | None:
        """The norm applied to the attention output before the residual add (None: there is none)."""
        return None

    def post_attention_scale(self, norm: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """``1 / r_pos`` ``[B, T]`` (float32) of the RMSNorm ``norm`` on its input ``[B, T, d]``: the
        forward's own ``rsqrt(mean(x^2) + eps)``, in float32 as HF's RMSNorms compute it."""
        eps = getattr(norm, "eps", None)
        if eps is None:
            eps = norm.variance_epsilon
        return torch.rsqrt(inputs.float().pow(2).mean(-1) + eps)

    def ffn_module(self, layer: nn.Module) -> nn.Module:  # pragma: no cover - abstract
        """The FFN (MLP or MoE block) whose output is what the FFN adds to the residual."""
        raise NotImplementedError

    def experts_module(self, layer: nn.Module) -> nn.Module | None:
        """The routed experts of a MoE FFN, called as ``experts(hidden [N, d], top_k_index [N, k],
        top_k_weights [N, k]) -> [N, d]`` (the router-weighted sum); None for a dense FFN."""
        return None

    @property
    def n_experts(self) -> int:
        """Routed experts per MoE layer (0: a dense model)."""
        return int(getattr(self.config, "num_local_experts", None) or getattr(self.config, "num_experts", None) or 0)

    # --- embedding side (SVD of W_OV onto the vocabulary, logit metrics) --------------------------
    def final_norm(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def unembedding(self) -> torch.Tensor:
        """``[vocab, d_model]`` rows that turn the final-normed residual into logits."""
        return self.model.get_output_embeddings().weight

    def value_weight(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W_V per kv head ``[H_kv, d_model, d_head]`` and bias ``[H_kv, d_head]`` (or None)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def attention_norm(self, layer: nn.Module) -> nn.Module:  # pragma: no cover - abstract
        """The norm the attention reads through (its gamma is folded into W_OV for the SVD)."""
        raise NotImplementedError

    # --- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _max_positions(config, *names: str) -> int | None:
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None


def refuse(family: str, problems: list[str]) -> None:
    """UnsupportedArchitectureError listing every config setting ``family``'s adapter cannot decompose."""
    if problems:
        raise UnsupportedArchitectureError(
            f"{family}: flowray cannot decompose this config exactly: " + "; ".join(problems)
        )


def linear_value_weight(lin: nn.Linear, n_kv: int, head_dim: int):
    """Split an ``nn.Linear`` value projection into ``[H_kv, d_model, d_head]`` + bias ``[H_kv, d_head]``."""
    d_model = lin.weight.shape[1]
    w = lin.weight.T.reshape(d_model, n_kv, head_dim).permute(1, 0, 2)  # [H_kv, d, dh]
    b = None if lin.bias is None else lin.bias.view(n_kv, head_dim)
    return w, b


class SelfAttentionWithVProj:
    """Adapter mixin for blocks that hold ``self_attn`` with a separate ``v_proj`` Linear (Llama family, OPT, Phi)."""

    def attention(self, layer):
        return layer.self_attn

    def value_module(self, layer):
        return layer.self_attn.v_proj

    def value_weight(self, layer):
        return linear_value_weight(layer.self_attn.v_proj, self.shape.n_kv_heads, self.shape.head_dim)
