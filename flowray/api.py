"""``edge_importances``: one forward pass -> every edge's importance, for a plain HF model or a LoadedModel."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flowray.batch_stats import LayerRows, span_tensors
from flowray.capture import LayerActivations, capture_layers
from flowray.checks import check_weights_loaded
from flowray.errors import InputError
from flowray.kernels import BlockOut, KernelConfig, select_kernel
from flowray.kernels.base import flat_output_projection
from flowray.limits import check_dense_output
from flowray.models.base import Adapter
from flowray.models.families import adapter_for
from flowray.models.loading import LoadedModel
from flowray.models.modes import eval_mode

FORMAT_VERSION = 1


@dataclass
class EdgeImportances:
    """Every edge importance of one sequence. ``L`` layers, ``H`` heads, ``T`` tokens; float32 numpy.

    Sequential blocks (GPT-2, OPT, Llama): the attention node ``x^{lA}_pos`` has parts
    ``attn[l, :, pos, :pos+1]`` (sub-edges, head x source) and ``attn_residual[l, pos]``; the block node
    ``x^l_pos`` has parts ``ffn[l, pos]`` and ``ffn_residual[l, pos]``.
    Parallel blocks (GPT-NeoX): one node ``x^l_pos`` with parts ``attn``, ``attn_residual`` and ``ffn``;
    ``ffn_residual`` is None. The parts of every node sum to 1 (or are all 0 when no part is close).
    """

    attn: np.ndarray  # [L, H, T, T]  (layer, head, pos, source j); 0 for j > pos
    attn_residual: np.ndarray  # [L, T]
    ffn: np.ndarray  # [L, T]
    ffn_residual: np.ndarray | None  # [L, T], None for parallel blocks
    token_ids: np.ndarray  # [T] int64
    tokens: list[str]  # [T] decoded one by one ("" entries when no tokenizer was given)
    predicted_ids: np.ndarray  # [T] the model's top next-token id at each position
    model_name: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def parallel(self) -> bool:
        return self.ffn_residual is None

    @property
    def n_layers(self) -> int:
        return self.attn.shape[0]

    @property
    def n_heads(self) -> int:
        return self.attn.shape[1]

    @property
    def n_tokens(self) -> int:
        return self.attn.shape[2]

    def head_importance(self) -> np.ndarray:
        """``[T, L, H]``: per prediction, each head's summed sub-edge importance ``sum_j e^h_{pos,j}``."""
        return self.attn.sum(axis=3).transpose(2, 0, 1)

    def component_importance(self) -> np.ndarray:
        """``[T, L*H + L]``: the paper's section 4 vector (heads layer-major, then one FFN per layer)."""
        T = self.n_tokens
        heads = self.head_importance().reshape(T, -1)
        return np.concatenate([heads, self.ffn.T], axis=1).astype(np.float32)

    # --- persistence: the documented array format (see README "Array format") -------------------
    def save(self, path: str | Path) -> Path:
        """Write a ``.npz`` with the arrays above plus a JSON ``meta`` string."""
        path = Path(path)
        arrays = {
            "attn": self.attn,
            "attn_residual": self.attn_residual,
            "ffn": self.ffn,
            "token_ids": self.token_ids,
            "predicted_ids": self.predicted_ids,
            "tokens": np.array(self.tokens, dtype=object).astype(str),
        }
        if self.ffn_residual is not None:
            arrays["ffn_residual"] = self.ffn_residual
        meta = {"format_version": FORMAT_VERSION, "model": self.model_name, "parallel": self.parallel, **self.meta}
        arrays["meta"] = np.array(json.dumps(meta))
        with open(path, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> EdgeImportances:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return cls(
                attn=z["attn"],
                attn_residual=z["attn_residual"],
                ffn=z["ffn"],
                ffn_residual=z["ffn_residual"] if "ffn_residual" in z.files else None,
                token_ids=z["token_ids"],
                tokens=[str(t) for t in z["tokens"]],
                predicted_ids=z["predicted_ids"],
                model_name=meta.pop("model", ""),
                meta={k: v for k, v in meta.items() if k not in ("format_version", "parallel")},
            )


def _unpack(model) -> tuple[torch.nn.Module, Adapter, object, str]:
    check_weights_loaded(model.model if isinstance(model, LoadedModel) else model)  # meta device: InputError
    if isinstance(model, LoadedModel):
        return model.model, model.adapter, model.tokenizer, model.name
    return model, adapter_for(model), None, getattr(model.config, "name_or_path", "") or ""


def check_input_ids(input_ids, adapter: Adapter, vocab_size: int | None) -> torch.Tensor:
    """Validate a ``[1, T]`` id tensor; InputError says what arrived and what is expected."""
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(np.asarray(input_ids))
    if input_ids.dim() == 1:
        raise InputError(
            f"input_ids must have shape [1, T]; got shape {tuple(input_ids.shape)} (use input_ids[None])"
        )
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise InputError(f"input_ids must have shape [1, T] (one sequence); got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"input_ids must be integer token ids; got dtype {input_ids.dtype}")
    T = input_ids.shape[1]
    if T == 0:
        raise InputError("input_ids is empty; need at least one token")
    limit = adapter.shape.max_positions
    if limit is not None and T > limit:
        raise InputError(
            f"sequence of {T} tokens is longer than the model's context of {limit} tokens; truncate it "
            f"(CLI: --max-tokens {limit})"
        )
    if vocab_size is not None and (int(input_ids.max()) >= vocab_size or int(input_ids.min()) < 0):
        raise InputError(f"token ids must lie in [0, {vocab_size}); got ids in [{int(input_ids.min())}, {int(input_ids.max())}]")
    return input_ids.long()


def encode_text(tokenizer, text: str, *, max_tokens: int | None = None, context: int | None = None,
                prepend_bos: bool = True) -> torch.Tensor:
    """``[1, T]`` ids of ``text``; InputError for empty text or text longer than the model's context.

    ``max_tokens`` keeps the first ``max_tokens`` tokens of the text (a cap on cost and the way past the
    context limit). ``prepend_bos`` puts ``flowray.text.document_start``'s token at position 0 (the
    tokenizer's BOS, else the model's document separator), as the corpus job does: idle heads park there
    instead of on the first word.
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"text is empty or only whitespace; got {text!r}; give at least one word")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise InputError(f"max_tokens must be a positive integer; got {max_tokens!r}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids  # [1, T]
    if ids.shape[1] == 0:
        raise InputError(f"text {text[:40]!r} encodes to no tokens")
    if max_tokens is not None:
        ids = ids[:, :max_tokens]
    lead = 1 if prepend_bos else 0
    if context is not None and ids.shape[1] + lead > context:
        with_bos = " with the BOS" if lead else ""
        raise InputError(
            f"text is {ids.shape[1] + lead} tokens long{with_bos}, longer than the model's context of {context} "
            f"tokens; pass --max-tokens {context - lead} (or less) to keep its first tokens"
        )
    if lead:
        from flowray.text import document_start

        ids = torch.cat([torch.tensor([[document_start(tokenizer).token_id]], dtype=ids.dtype), ids], dim=1)
    return ids


def decode_tokens(tokenizer, ids: list[int]) -> list[str]:
    if tokenizer is None:
        return ["" for _ in ids]
    return [tokenizer.decode([i]) for i in ids]


@torch.no_grad()
def edge_importances(
    model,
    input_ids,
    *,
    tokenizer=None,
    chunk_size: int | None = None,
    element_budget: int | None = None,
    backend: str = "auto",
) -> EdgeImportances:
    """Every edge importance of one sequence in one forward pass.

    Args:
        model: a ``transformers`` causal LM of a supported family, or a ``flowray.LoadedModel``.
        input_ids: ``[1, T]`` token ids.
        tokenizer: optional, to fill ``tokens`` (a LoadedModel brings its own).
        chunk_size, element_budget: query positions processed at once by the ``"torch"`` and ``"triton"``
            backends (peak extra memory about ``H * chunk_size * T`` floats per work tensor).
        backend: the kernel (``flowray.kernels``): ``"auto"`` (compiled loops on the CPU, Triton on CUDA
            when it is installed, else vectorised torch), ``"cpu"``, ``"torch"`` or ``"triton"``.
    """
    return edge_importances_batch(
        model, [input_ids], tokenizer=tokenizer, chunk_size=chunk_size, element_budget=element_budget,
        backend=backend,
    )[0]


@torch.no_grad()
def edge_importances_batch(
    model,
    sequences: list,
    *,
    tokenizer=None,
    padding_side: str = "right",
    chunk_size: int | None = None,
    element_budget: int | None = None,
    backend: str = "auto",
) -> list[EdgeImportances]:
    """``edge_importances`` for several ``[1, T_i]`` sequences of any lengths in one padded forward pass.

    The batch carries an attention mask and position ids counted from each sequence's first real token,
    so every sequence gets what it would get alone, with either ``padding_side`` (left padding is what
    generation code uses; right padding is the default). Returns one result per sequence, unpadded.
    """
    if not sequences:
        return []
    input_ids, attention_mask = pad_sequences(model, sequences, padding_side)
    return edge_importances_padded(
        model, input_ids, attention_mask, tokenizer=tokenizer, chunk_size=chunk_size,
        element_budget=element_budget, backend=backend,
    )


@torch.no_grad()
def edge_importances_padded(
    model,
    input_ids,
    attention_mask,
    *,
    tokenizer=None,
    chunk_size: int | None = None,
    element_budget: int | None = None,
    backend: str = "auto",
) -> list[EdgeImportances]:
    """``edge_importances`` for a padded batch as a tokenizer returns it (``padding=True``).

    Args:
        input_ids: ``[B, T]`` token ids.
        attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding; each row's real tokens must be one
            run (left or right padding). Position ids are counted from each row's first real token.
    Returns:
        one ``EdgeImportances`` per row, over that row's real tokens only.
    """
    hf_model, adapter, own_tokenizer, name = _unpack(model)
    tokenizer = tokenizer if tokenizer is not None else own_tokenizer
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise InputError(f"chunk_size must be a positive number of positions; got {chunk_size!r}")
    input_ids, spans, forward_kwargs = padded_forward_inputs(hf_model, adapter, input_ids, attention_mask)
    s = adapter.shape
    check_dense_output(s.n_layers, s.n_heads, [T for _, T in spans])  # before allocating [L, H, T, T]
    device = next(hf_model.parameters()).device
    kernel = select_kernel(backend, device, KernelConfig(element_budget=element_budget, chunk_size=chunk_size))
    budget = kernel.config.budget(device)
    # whole-batch kernels take the padded batch as one block; the others each sequence on its own span
    plan = kernel.plan(spans, s.n_heads, budget) if kernel.whole_batch else [
        (b, b + 1, start, T) for b, (start, T) in enumerate(spans)]
    # a GPU copies each layer into pinned host memory asynchronously; when every block is one chunk of
    # rows the copies cover every element, so the buffers need no zeroing (a second pass over ~GBs)
    pinned = device.type == "cuda"
    whole = pinned and all(kernel.rows_per_block(stop - first, s.n_heads, T, budget) >= T for first, stop, _, T in plan)
    results = [_Buffers(s.n_layers, s.n_heads, T, s.parallel, pinned, zero=not whole) for _, T in spans]
    sink = _HostSink(device)
    layers = adapter.layers()
    spans_on_device = span_tensors(spans, device) if kernel.whole_batch else None

    def consume(rec: LayerActivations) -> None:
        w_o, _bias = adapter.output_projection(layers[rec.layer])  # the bias is in the node, in no edge
        w_o = w_o.detach()
        w_flat = flat_output_projection(w_o)
        for block in plan:
            _layer_block(kernel, rec, block, spans, w_o, w_flat, s.parallel, results, sink, budget, spans_on_device)

    # eval mode for the pass (dropout would change what is decomposed); the caller's mode is restored
    keep = budget if kernel.whole_batch else None
    with eval_mode(hf_model), capture_layers(hf_model, adapter, consume, reuse_probs=True, keep_up_to=keep):
        logits = hf_model(**forward_kwargs).logits  # [B, T, V]
    predicted = logits.argmax(-1).cpu().numpy()  # [B, T]
    del logits
    sink.wait()
    out = []
    for b, ((start, T), buf) in enumerate(zip(spans, results)):
        id_list = input_ids[b, start : start + T].tolist()
        out.append(EdgeImportances(
            attn=buf.attn.numpy(),
            attn_residual=buf.attn_residual.numpy(),
            ffn=buf.ffn.numpy(),
            ffn_residual=None if buf.ffn_residual is None else buf.ffn_residual.numpy(),
            token_ids=np.asarray(id_list, dtype=np.int64),
            tokens=decode_tokens(tokenizer, id_list),
            predicted_ids=predicted[b, start : start + T].astype(np.int64),
            model_name=name,
        ))
    return out


def pad_sequences(model, sequences: list, padding_side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``[1, T_i]`` id tensors (validated) -> a padded ``[B, T]`` batch and its attention mask."""
    if padding_side not in ("right", "left"):
        raise InputError(f"padding_side must be 'right' or 'left'; got {padding_side!r}")
    hf_model, adapter, _, _ = _unpack(model)
    vocab = getattr(hf_model.config, "vocab_size", None)
    seqs = [check_input_ids(ids, adapter, vocab)[0] for ids in sequences]  # [T_i] each
    T_max = max(int(t.shape[0]) for t in seqs)
    input_ids = torch.zeros(len(seqs), T_max, dtype=torch.long)  # pad id 0: masked out, never read
    attention_mask = torch.zeros(len(seqs), T_max, dtype=torch.long)
    for b, t in enumerate(seqs):
        span = slice(0, len(t)) if padding_side == "right" else slice(T_max - len(t), T_max)
        input_ids[b, span], attention_mask[b, span] = t, 1
    return input_ids, attention_mask


def padded_forward_inputs(hf_model, adapter: Adapter, input_ids, attention_mask):
    """Validate a padded batch; returns its ids ``[B, T]``, each row's ``(start, length)`` and the forward
    pass's arguments (ids, mask and position ids counted from each row's first real token, on the model's
    device, no cache)."""
    input_ids, attention_mask = torch.as_tensor(input_ids), torch.as_tensor(attention_mask)
    spans = _real_spans(input_ids, attention_mask)
    vocab = getattr(hf_model.config, "vocab_size", None)
    for b, (start, T) in enumerate(spans):
        check_input_ids(input_ids[b : b + 1, start : start + T], adapter, vocab)
    device = next(hf_model.parameters()).device
    mask = attention_mask.long()
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)  # [B, T] 0 at each row's first real token
    kwargs = dict(input_ids=input_ids.long().to(device), attention_mask=mask.to(device),
                  position_ids=position_ids.to(device), use_cache=False)
    return input_ids, spans, kwargs


def _real_spans(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, length)`` of each row's one run of real tokens; InputError for anything else."""
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise InputError(
            f"input_ids and attention_mask must both have shape [B, T]; got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise InputError("attention_mask must hold only 0 (padding) and 1 (real token)")
    spans = []
    for b, row in enumerate(attention_mask.long()):
        real = torch.nonzero(row).squeeze(1)
        if real.numel() == 0:
            raise InputError(f"row {b} of attention_mask is all padding; every row needs at least one token")
        start, T = int(real[0]), int(real.numel())
        if int(real[-1]) - start + 1 != T:
            raise InputError(
                f"row {b} of attention_mask has padding between real tokens (ones at {real.tolist()}); "
                "pad on the left or on the right only"
            )
        spans.append((start, T))
    return spans


class _Buffers:
    """Output arrays of one sequence, filled layer by layer (pinned host memory when a GPU copies into them)."""

    def __init__(self, L: int, H: int, T: int, parallel: bool, pinned: bool = False, zero: bool = True):
        self.attn = (torch.zeros if zero else torch.empty)(L, H, T, T, pin_memory=pinned)
        self.attn_residual = torch.zeros(L, T, pin_memory=pinned)
        self.ffn = torch.zeros(L, T, pin_memory=pinned)
        self.ffn_residual = None if parallel else torch.zeros(L, T, pin_memory=pinned)


class _HostSink:
    """Copies device results into host buffers on a side stream, so that a layer's copy overlaps the next
    layer's computation; on the CPU a plain copy. ``wait`` before reading the host buffers."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def put(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self.stream is None:
            dst.copy_(src)
            return
        done = torch.cuda.Event()
        done.record()  # after the computation that wrote src, on the current stream
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(done)
            dst.copy_(src, non_blocking=True)
        src.record_stream(self.stream)  # its memory is not reused before the copy ends

    def wait(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


def _layer_block(kernel, rec: LayerActivations, block, spans, w_o, w_flat, parallel: bool, results: list,
                 sink: _HostSink, budget: int, spans_on_device=None) -> None:
    """Importances of layer ``rec.layer`` for batch rows ``first .. stop - 1`` on a grid of ``T_grid``
    padded positions from ``off`` (one sequence's span, or the whole padded batch)."""
    l = rec.layer
    first, stop, off, T_grid = block
    G = stop - first
    layer = LayerRows(kernel, rec, block, spans, w_o, w_flat, parallel)
    y, starts, lengths = layer.y, layer.starts, layer.lengths
    H = w_o.shape[0]
    # the CPU kernel takes a sequence in one block and writes straight into the result
    C = T_grid if kernel.name == "cpu" else kernel.rows_per_block(G, H, T_grid, budget)
    direct = torch.empty(len(layer.parts), G, T_grid, dtype=torch.float32, device=y.device)
    for p0, p1, blk in layer.blocks(C, spans_on_device):
        direct_cpu = G == 1 and p0 == 0 and p1 == T_grid and y.device.type == "cpu"
        sub = results[first].attn[l][None] if direct_cpu else torch.empty(G, H, p1 - p0, p1, device=y.device)
        kernel.block(blk, BlockOut(direct=direct[:, :, p0:p1], sub=sub))
        if direct_cpu:
            continue
        for g, b in enumerate(range(first, stop)):
            start, T = starts[g], lengths[g]
            lo, hi = max(p0, start), min(p1, start + T)  # this sequence's real rows in the block
            if lo < hi:
                sink.put(results[b].attn[l, :, lo - start : hi - start, : hi - start],
                         sub[g, :, lo - p0 : hi - p0, start:hi])
    block_node = None if parallel else layer.block_node()
    for g, b in enumerate(range(first, stop)):
        start, T = starts[g], lengths[g]
        own = slice(start, start + T)
        buf = results[b]
        sink.put(buf.attn_residual[l], direct[0, g, own])
        if parallel:
            sink.put(buf.ffn[l], direct[1, g, own])
        else:
            sink.put(buf.ffn_residual[l], block_node[0, g, own])
            sink.put(buf.ffn[l], block_node[1, g, own])
