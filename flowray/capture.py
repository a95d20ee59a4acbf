"""One forward pass under hooks, handing each layer's activations to a consumer as soon as the layer ends.

Streaming per layer keeps peak memory at one layer's attention probabilities (``[B, H, T, T]``) instead
of all ``L`` of them; the consumer (``flowray.api.edge_importances``) turns them into importances and
drops them before the next layer runs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from flowray.errors import UnsupportedArchitectureError
from flowray.models.attention import attention_implementation
from flowray.models.base import Adapter


@dataclass(frozen=True)
class LayerActivations:
    """What one decoder block did. ``B`` batch, ``T`` tokens, ``d`` d_model, ``H`` query heads."""

    layer: int
    inputs: torch.Tensor  # [B, T, d]  x^{l-1}: the residual stream entering the block
    attn_out: torch.Tensor  # [B, T, d]  what the attention adds to the residual (W_O and its bias applied;
    #                         post-attention norm applied too where the block has one: Gemma 2/3, OLMo-2)
    values: torch.Tensor  # [B, H_kv, T, d_head]  value vectors incl. value bias
    probs: torch.Tensor | AttentionRows  # [B, H, T, T] post-softmax weights (query pos, source j), or
    #   with capture_layers(rows=True) an AttentionRows that recomputes any rows of them on demand
    outputs: torch.Tensor  # [B, T, d]  x^l: the residual stream leaving the block
    # [B, T] float32  1/r_pos of the post-attention norm per query position (None: no such norm, i.e. 1);
    # the sub-edges are row_scale[pos] * probs[h, pos, j] * v_j (W_O diag(gamma))^h
    row_scale: torch.Tensor | None = None

    def prob_rows(self, b: int, start: int, p0: int, p1: int) -> torch.Tensor:
        """``[H, C, p1]`` weights of row ``b``'s real positions ``p0 .. p1 - 1`` over its sources ``< p1``,
        for a row whose real tokens start at ``start`` (left padding); positions count from ``start``."""
        return self.block_rows(b, b + 1, start, p0, p1)[0]

    def block_rows(self, first: int, stop: int, offset: int, p0: int, p1: int) -> torch.Tensor:
        """``[G, H, C, p1]`` weights of batch rows ``first .. stop - 1`` at grid positions ``p0 .. p1 - 1``
        over sources ``< p1``, on a grid that starts at padded position ``offset``."""
        if isinstance(self.probs, AttentionRows):
            return self.probs.block(first, stop, offset, p0, p1)
        return self.probs[first:stop, :, offset + p0 : offset + p1, offset : offset + p1]


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


CAPTURE_IMPLEMENTATION = "flowray_capture"  # the name registered with transformers' AttentionInterface
# rows of queries per chunk: a chunk's scores are [B, H, C, p1] for its last row p1, so chunks skip the
# masked upper triangle (half the work of a full [T, T] product at long contexts); on a CPU a chunk stays in
# cache. On a GPU chunks are as large as _GPU_CHUNK_SCORES float32 scores allow (512 MiB): each chunk costs
# about 11 kernel launches, and a whole 8 x 512-token batch of a 7B model is one chunk
_ROW_CHUNK = 128
_GPU_CHUNK_SCORES = 1 << 27


def _row_chunk(device: torch.device, B: int, H: int, T: int) -> int:
    """Query rows per chunk of the capture's attention for ``B`` sequences of ``T`` tokens and ``H`` heads."""
    if device.type != "cuda":
        return _ROW_CHUNK
    return max(_ROW_CHUNK, _GPU_CHUNK_SCORES // max(1, B * H * T))


# capture_layers(rows=True) still keeps a layer's weights when they have at most this many elements
# (64 MiB of float32): below it recomputing rows costs more than holding them
KEEP_WEIGHTS_UP_TO = 1 << 24
# Inside capture_layers(reuse_probs=True): one [B, H, T, T] buffer that every layer's probabilities go into.
# A fresh 40 MB tensor per layer costs ~20 ms of page faults at 1024 tokens (glibc maps allocations that
# large afresh each time), as much as the attention itself; a streaming consumer is done with a layer's
# probabilities before the next layer runs, so one buffer serves them all.
_scratch = threading.local()


def _chunk_weights(q: torch.Tensor, key: torch.Tensor, attention_mask, p0: int, p1: int, low: float,
                   softcap: float | None = None) -> torch.Tensor:
    """Attention weights of query rows ``p0 .. p1 - 1`` over keys ``< p1``: ``[B, H, C, p1]`` float32.

    q ``[B, H_kv, g, T, dh]`` queries already scaled; key ``[B, H_kv, T, dh]``; attention_mask as
    ``_capture_attention`` takes it; softcap: Gemma 2's attention-logit soft-capping (``softcap *
    tanh(scores / softcap)`` before the mask). The forward pass and ``AttentionRows`` both call this, so
    recomputed rows are the forward's own weights.
    """
    B, H_kv, g, _, dh = q.shape
    C = p1 - p0
    rows = q[:, :, :, p0:p1].reshape(B, H_kv, g * C, dh)  # the group's query heads stacked
    scores = torch.matmul(rows, key[:, :, :p1].transpose(-1, -2)).view(B, H_kv * g, C, p1).float()  # [B, H, C, p1]
    if softcap:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    if attention_mask is None:
        future = torch.ones(C, C, dtype=torch.bool, device=q.device).triu_(1)
        scores[..., p0:p1].masked_fill_(future, low)  # causal: only the diagonal block has future keys
    elif attention_mask.dtype == torch.bool:
        scores.masked_fill_(~attention_mask[:, :, p0:p1, :p1], low)
    else:
        scores += attention_mask[:, :, p0:p1, :p1]
    return torch.softmax(scores, dim=-1)


class AttentionRows:
    """One layer's attention weights, kept as the queries and keys that make them (``O(T)`` memory).

    ``rows(b, start, p0, p1)`` recomputes ``[H, C, p1]`` weights for a chunk of query rows exactly as the
    forward pass computed them, so a consumer never holds a ``[H, T, T]`` tensor.
    """

    def __init__(self, q: torch.Tensor, key: torch.Tensor, attention_mask, dtype: torch.dtype, softcap=None):
        self.q, self.key, self.mask, self.dtype = q, key, attention_mask, dtype  # q [B, H_kv, g, T, dh]
        self.softcap = softcap

    def rows(self, b: int, start: int, p0: int, p1: int) -> torch.Tensor:
        return self.block(b, b + 1, start, p0, p1)[0]  # [H, C, p1]

    def block(self, first: int, stop: int, offset: int, p0: int, p1: int) -> torch.Tensor:
        """``[G, H, C, p1]`` for batch rows ``first .. stop - 1``, rows ``p0 .. p1 - 1`` of a grid starting at
        padded position ``offset`` (see ``LayerActivations.block_rows``)."""
        q = self.q[first:stop, :, :, offset:]  # [G, H_kv, g, T_grid, dh]
        key = self.key[first:stop, :, offset:]
        mask = None if self.mask is None else self.mask[first:stop, :, offset:, offset:]
        low = torch.finfo(torch.float32).min
        return _chunk_weights(q, key, mask, p0, p1, low, self.softcap).to(self.dtype)


def _capture_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **_kwargs
):
    """Eager attention that also returns the probabilities, with less work than transformers' eager one.

    The same maths as every supported family's ``eager_attention_forward`` (``softmax(q k^T * scaling +
    mask)`` in float32, cast to the query's dtype, times the values; grouped-query heads read kv head
    ``h // group``), computed in chunks of query rows against only the keys they can see, with the scale
    folded into the queries, the mask applied in place and no ``repeat_kv`` copies. At 1024 tokens on
    SmolLM2 transformers' eager attention doubles the cost of a forward pass; this keeps the capture close
    to the default (sdpa) forward. ``softcap`` (Gemma 2's attention-logit soft-capping) maps the scaled
    scores to ``softcap * tanh(scores / softcap)`` before the mask, as Gemma 2's eager function does.

    query ``[B, H, T, dh]``; key, value ``[B, H_kv, T, dh]``; attention_mask: None (causal, no padding),
    a boolean ``[B, 1, T, T]`` (True: attend) or an additive float mask. Returns the output
    ``[B, T, H, dh]`` and the weights ``[B, H, T, T]`` (exactly 0 above the diagonal and where masked), or
    inside ``capture_layers(rows=True)`` an ``AttentionRows`` instead of the weights.
    """
    if module.training and dropout:
        raise UnsupportedArchitectureError("flowray captures attention in eval mode only; call model.eval()")
    B, H, T, dh = query.shape
    H_kv, Tk = key.shape[1], key.shape[2]
    if Tk != T:
        raise UnsupportedArchitectureError(
            f"flowray needs a forward pass without a cache; got {T} queries, {Tk} keys (call the model with "
            "use_cache=False and no past_key_values)"
        )
    g = H // H_kv
    scaling = dh**-0.5 if scaling is None else scaling
    low = torch.finfo(torch.float32).min  # what eager masks add: exp() of it is exactly 0, never NaN
    # rows mode keeps queries and keys (O(T)) instead of the weights, except where all of a layer's weights
    # are small: then holding them is cheaper than recomputing every row (short texts, the common case)
    keep_up_to = getattr(_scratch, "keep_up_to", None)
    keep_up_to = KEEP_WEIGHTS_UP_TO if keep_up_to is None else keep_up_to
    rows_mode = getattr(_scratch, "rows", False) and B * H * T * T > keep_up_to
    probs = None
    if not rows_mode:
        probs = getattr(_scratch, "probs", None)
        if probs is None or probs.shape != (B, H, T, T) or probs.dtype != query.dtype or probs.device != query.device:
            probs = torch.empty(B, H, T, T, dtype=query.dtype, device=query.device)
            if getattr(_scratch, "reuse", False):
                _scratch.probs = probs
    out = torch.empty(B, T, H, dh, dtype=query.dtype, device=query.device)
    q_all = (query * scaling).view(B, H_kv, g, T, dh)
    rows_per_chunk = _row_chunk(query.device, B, H, T)
    for p0 in range(0, T, rows_per_chunk):
        p1 = min(T, p0 + rows_per_chunk)
        C = p1 - p0
        weights = _chunk_weights(q_all, key, attention_mask, p0, p1, low, softcap).to(query.dtype)  # [B, H, C, p1]
        if probs is not None:
            probs[:, :, p0:p1, :p1] = weights
            probs[:, :, p0:p1, p1:] = 0.0
        chunk = torch.matmul(weights.view(B, H_kv, g * C, p1), value[:, :, :p1])  # [B, H_kv, g * C, dh]
        out[:, p0:p1] = chunk.view(B, H, C, dh).transpose(1, 2)
    if rows_mode:
        return out, AttentionRows(q_all, key, attention_mask, query.dtype, softcap)
    return out, probs


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` with an attention that returns exact probabilities (``_capture_attention``).

    Models whose attention implementation transformers cannot switch to a registered function fall back
    to transformers' own ``"eager"``. The previous implementation is restored on exit.
    """
    with attention_implementation(model, CAPTURE_IMPLEMENTATION, _capture_attention, mask="sdpa",  # plain causal: ours
                                  fallback="eager", accept=("eager",)):
        yield


@contextlib.contextmanager
def capture_layers(
    model: torch.nn.Module,
    adapter: Adapter,
    consumer: Callable[[LayerActivations], None],
    *,
    reuse_probs: bool = False,
    rows: bool = False,
    keep_up_to: int | None = None,
) -> Iterator[None]:
    """Within the block, every forward pass of ``model`` calls ``consumer`` once per decoder layer.

    Hooks are attached on entry and always removed on exit, so a long-lived actor's model stays clean.
    With ``reuse_probs`` every layer's ``probs`` lives in one buffer that the next layer overwrites: for
    consumers that are done with a record when they return (saves the page faults of a fresh ``[B, H, T, T]``
    tensor per layer); keep it False to hold records beyond the call. With ``rows`` a record's ``probs`` is
    an ``AttentionRows`` (queries and keys, ``O(T)``) that recomputes chunks of weights on demand, when the
    model runs flowray's capture attention and a layer's weights would exceed ``keep_up_to`` elements
    (default ``KEEP_WEIGHTS_UP_TO``; transformers' eager fallback always gives full weights).
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

        def on_post_attention(norm, args, output):
            # the norm's output is what enters the residual; 1 / r_pos of its input rescales alpha's rows
            state["attn_out"] = _first(output)
            state["row_scale"] = adapter.post_attention_scale(norm, args[0])  # [B, T]

        needed = {"inputs", "values", "attn_out", "probs"}
        if adapter.post_attention(layer) is not None:
            needed.add("row_scale")

        def post_layer(_module, _args, output):
            missing = needed - state.keys()
            if missing:
                raise UnsupportedArchitectureError(
                    f"layer {index}: hooks did not see {sorted(missing)}; the {adapter.family} adapter's "
                    "module names do not match this model"
                )
            consumer(LayerActivations(layer=index, outputs=_first(output), **state))
            state.clear()

        return pre_layer, on_values, on_attention, on_post_attention, post_layer

    try:
        for index, layer in enumerate(adapter.layers()):
            pre_layer, on_values, on_attention, on_post_attention, post_layer = make_hooks(index, layer)
            handles.append(layer.register_forward_pre_hook(pre_layer, with_kwargs=True))
            handles.append(adapter.value_module(layer).register_forward_hook(on_values))
            handles.append(adapter.attention(layer).register_forward_hook(on_attention))
            post_norm = adapter.post_attention(layer)
            if post_norm is not None:  # it runs after the attention module: its output replaces attn_out
                handles.append(post_norm.register_forward_hook(on_post_attention))
            handles.append(layer.register_forward_hook(post_layer))
        _scratch.reuse = reuse_probs
        _scratch.rows = rows
        _scratch.keep_up_to = keep_up_to
        with eager_attention(model):
            yield
    finally:
        for handle in handles:
            handle.remove()
        state.clear()
        _scratch.reuse = False
        _scratch.rows = False
        _scratch.keep_up_to = None
        _scratch.probs = None


def capture_all(model: torch.nn.Module, adapter: Adapter, input_ids: torch.Tensor) -> list[LayerActivations]:
    """All layers' activations of one forward pass, kept in memory (for tests and small inputs)."""
    records: list[LayerActivations] = []
    with capture_layers(model, adapter, records.append), torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    return records


# Positions per chunk of the streamed argmax: [B, chunk, V] logits at a time instead of [B, T, V].
_ARGMAX_CHUNK = 256


@contextlib.contextmanager
def predicted_ids(model: torch.nn.Module, sink: list, positions: list[int] | None = None) -> Iterator[None]:
    """Within the block, a forward pass appends its top-1 next-token ids ``[B, T]`` to ``sink`` without the
    ``[B, T, V]`` logits: the output embedding gets the final hidden states, computes the argmax in chunks of
    positions and passes on only the last position (the model's logits then hold that one position).
    ``positions``: one position per batch row; then only those rows go through the output embedding (the
    model's logits hold them, ``[B, 1, V]``) and ``sink`` gets their ``[B]`` ids.

    Exact for models whose logits are the output embedding's output or a monotone map of it (soft-capping,
    scaling by a positive constant); the hooks are removed on exit.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise UnsupportedArchitectureError(
            f"the output embedding is a {type(head).__name__}, not a Linear layer; flowray cannot stream its argmax"
        )

    def pre_hook(_module, args):
        hidden = args[0]  # [B, T, d]
        if positions is not None:  # the model's own output embedding reads those rows; hook() takes the argmax
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            return (hidden[rows, torch.tensor(positions, device=hidden.device)][:, None], *args[1:])  # [B, 1, d]
        top = torch.empty(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        for c0 in range(0, hidden.shape[1], _ARGMAX_CHUNK):
            c1 = min(hidden.shape[1], c0 + _ARGMAX_CHUNK)
            top[:, c0:c1] = torch.nn.functional.linear(hidden[:, c0:c1], head.weight, head.bias).argmax(-1)
        sink.append(top)
        return (hidden[:, -1:], *args[1:])

    def hook(_module, _args, output):
        sink.append(output[:, 0].argmax(-1))  # [B]

    handles = [head.register_forward_pre_hook(pre_hook)]
    if positions is not None:
        handles.append(head.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
