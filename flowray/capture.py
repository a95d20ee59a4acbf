"""One forward pass under hooks, handing each layer's activations to a consumer as soon as the layer ends.

Streaming per layer keeps peak memory at one layer's attention probabilities (``[B, H, T, T]``) instead
of all ``L`` of them; the consumer (``flowray.api.edge_importances``) turns them into importances and
drops them before the next layer runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from flowray.errors import UnsupportedArchitectureError
from flowray.models.base import Adapter


@dataclass(frozen=True)
class LayerActivations:
    """What one decoder block did. ``B`` batch, ``T`` tokens, ``d`` d_model, ``H`` query heads."""

    layer: int
    inputs: torch.Tensor  # [B, T, d]  x^{l-1}: the residual stream entering the block
    attn_out: torch.Tensor  # [B, T, d]  attention block output (W_O applied, output bias included)
    values: torch.Tensor  # [B, H_kv, T, d_head]  value vectors incl. value bias
    probs: torch.Tensor  # [B, H, T, T]  post-softmax attention weights, (query pos, source j)
    outputs: torch.Tensor  # [B, T, d]  x^l: the residual stream leaving the block


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` with eager attention (the only implementation that returns exact probabilities)."""
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    if previous == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if previous is not None:
            model.set_attn_implementation(previous)


@contextlib.contextmanager
def capture_layers(
    model: torch.nn.Module, adapter: Adapter, consumer: Callable[[LayerActivations], None]
) -> Iterator[None]:
    """Within the block, every forward pass of ``model`` calls ``consumer`` once per decoder layer.

    Hooks are attached on entry and always removed on exit, so a long-lived actor's model stays clean.
    """
    handles = []
    state: dict = {}

    def make_hooks(index: int, layer: torch.nn.Module):
        def pre_layer(_module, args, kwargs):
            state.clear()
            state["inputs"] = args[0] if args else kwargs["hidden_states"]

        def on_values(_module, _args, output):
            vals = adapter.values_from(_first(output))  # [B, T, H_kv, dh]
            state["values"] = vals.transpose(1, 2)  # [B, H_kv, T, dh]

        def on_attention(_module, _args, output):
            if not isinstance(output, (tuple, list)) or len(output) < 2 or output[1] is None:
                raise UnsupportedArchitectureError(
                    f"layer {index}: the attention module returned no attention weights; flowray needs "
                    "eager attention (it switches it on inside capture_layers, so this model's attention "
                    "ignores config._attn_implementation)"
                )
            state["attn_out"], state["probs"] = output[0], output[1]

        def post_layer(_module, _args, output):
            missing = {"inputs", "values", "attn_out", "probs"} - state.keys()
            if missing:
                raise UnsupportedArchitectureError(
                    f"layer {index}: hooks did not see {sorted(missing)}; the {adapter.family} adapter's "
                    "module names do not match this model"
                )
            consumer(LayerActivations(layer=index, outputs=_first(output), **state))
            state.clear()

        return pre_layer, on_values, on_attention, post_layer

    try:
        for index, layer in enumerate(adapter.layers()):
            pre_layer, on_values, on_attention, post_layer = make_hooks(index, layer)
            handles.append(layer.register_forward_pre_hook(pre_layer, with_kwargs=True))
            handles.append(adapter.value_module(layer).register_forward_hook(on_values))
            handles.append(adapter.attention(layer).register_forward_hook(on_attention))
            handles.append(layer.register_forward_hook(post_layer))
        with eager_attention(model):
            yield
    finally:
        for handle in handles:
            handle.remove()
        state.clear()


def capture_all(model: torch.nn.Module, adapter: Adapter, input_ids: torch.Tensor) -> list[LayerActivations]:
    """All layers' activations of one forward pass, kept in memory (for tests and small inputs)."""
    records: list[LayerActivations] = []
    with capture_layers(model, adapter, records.append), torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    return records
