"""Edge importances by ALTI proximity (paper section 2.1). Tensors in, tensors out; no model in sight.

A node ``y`` is a sum of parts ``z_k``; ``prox(z, y) = max(||y||_1 - ||y - z||_1, 0)`` and
``importance(z_k, y) = prox(z_k, y) / sum_i prox(z_i, y)`` (0 for every part when all proximities are 0).

Attention sub-edges are ``z = a * F`` with ``a = alpha^h_{pos,j}`` and ``F = f^h(x_j)``, the head's value
at ``j`` (value bias included) times its slice of W_O. There are ``H * T^2 / 2`` of them per layer, each of
dimension ``d``; materialising them (the official implementation) costs ``T^2 * H * d`` memory. We never do.

The trick. With ``s = sign(y)`` (``sign(0) := +1``) every coordinate satisfies, exactly,

    |y_d - a F_d| = |y_d| - a s_d F_d + 2 * relu(a s_d F_d - |y_d|)

so ``prox(aF, y) = relu(a (s . F) - 2 * sum_d relu(a s_d F_d - |y_d|))``. The first term is a matrix
product, and ``s . F = (s W_O^h) . v_j`` even costs ``d_head`` instead of ``d`` per pair. The correction
term is non-zero only on coordinates where ``a |F_d| > |y_d|``, i.e. where the part overshoots the whole;
all of them lie among the ``n = #{d : |y_d| < a * max|F|}`` smallest coordinates of ``|y|``. Pairs with
``a * s.F <= 0`` need no correction at all (their proximity is 0), nor do pairs with ``n = 0``.

The backends (``flowray.kernels``, one file each, behind one interface) compute the same thing:

- ``"cpu"``: compiled loops (numba) that visit each sub-edge once and take its cheapest exact case: no
  correction, the few smallest coordinates of ``|y|``, or a vectorised ``O(d)`` distance; they write
  straight into the result and also normalise there.
- ``"triton"``: GPUs. A handful of launches per layer for the whole padded batch: the matrix products on
  tensor cores where the model is in half precision (exact: ``s`` is +-1), the tiled ``lin`` fused with
  each sub-edge's exact case, sub-edges with many candidate coordinates compacted into lists, then node
  totals, normalisation and the job's per-row reductions in one pass; no host synchronisation.
- ``"torch"``: vectorised torch for any device: chunks of query positions, the smallest coordinates of
  ``|y|`` once per position (``topk``) and a ragged gather over the ``n`` candidates; the rare pairs with
  more than ``dense_rank`` candidates get a direct ``O(d)`` distance instead.

The result is exact, not an approximation: the tests compare both with a materialising float64
reference. Inputs may be float16/bfloat16 (a half-precision model's own activations); every product and
sum runs in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowray.errors import InputError
from flowray.kernels import BACKENDS, HeadOutputs, KernelConfig, resolve_backend, select_kernel
from flowray.kernels.base import check_heads, flat_output_projection, proximity
from flowray.kernels.base import head_outputs_dense as head_outputs

__all__ = ["BACKENDS", "HeadOutputs", "NodeImportances", "attention_node", "direct_node", "flat_output_projection",
           "head_outputs", "head_outputs_of", "normalise", "proximity", "resolve_backend", "sub_edge_proximity"]


@dataclass(frozen=True)
class NodeImportances:
    """Importances of one node type's parts for every position of one layer."""

    attn: torch.Tensor | None  # [H, T, T]  sub-edge (head h, pos, source j); 0 for j > pos
    direct: torch.Tensor  # [K, T]  the direct parts (residual, FFN, ...) in the order given


def head_outputs_of(values: torch.Tensor, w_o: torch.Tensor, *, backend: str = "auto",
                    w_flat: torch.Tensor | None = None) -> HeadOutputs:
    """The ``backend``'s ``HeadOutputs`` of values ``[H_kv, T, dh]`` (or ``[G, H_kv, T, dh]``, then ``F`` and
    ``f_max`` have a leading ``G``) and W_O ``[H, dh, d]`` (``w_flat``: ``flat_output_projection(w_o)``)."""
    check_heads(w_o.shape[0], values.shape[-3])
    kernel = select_kernel(backend, values.device)
    if values.dim() == 3:
        heads = kernel.head_outputs(values[None], w_o, w_flat)
        return HeadOutputs(heads.values[0], heads.w_o, heads.w_flat, heads.F[0], heads.f_max[0])
    return kernel.head_outputs(values, w_o, w_flat)


def sub_edge_proximity(
    y: torch.Tensor,
    probs: torch.Tensor,
    values: torch.Tensor,
    w_o: torch.Tensor,
    *,
    chunk_size: int | None = None,
    element_budget: int | None = None,
    dense_rank: int = 64,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Proximity of every attention sub-edge ``alpha^h_{pos,j} f^h(x_j)`` to its node ``y_pos``.

    Args:
        y: ``[T, d]`` the attention node ``x^{lA}`` (or ``x^l`` for parallel blocks), float32.
        probs: ``[H, T, T]`` attention weights ``alpha[h, pos, j]``; entries with ``j > pos`` are ignored.
        values: ``[H_kv, T, dh]`` value vectors (value bias included); H must be a multiple of H_kv.
        w_o: ``[H, dh, d]`` each head's slice of the output projection.
        chunk_size: query positions per chunk (peak extra memory ~ ``H * chunk_size * T`` floats); None
            picks the largest chunk within ``element_budget``. The CPU backend takes one chunk.
        dense_rank: the torch backend's switch to a direct ``O(d)`` distance (same result; a speed knob).
        backend: ``"auto"``, ``"cpu"``, ``"torch"`` or ``"triton"`` (see ``flowray.kernels``).
        out: optional float32 ``[H, T, T]`` tensor on ``y``'s device to write the result into.
    Returns:
        ``[H, T, T]`` proximities, zero for ``j > pos`` (``out`` when given).
    """
    H, T, _ = probs.shape
    check_heads(H, values.shape[0])
    config = KernelConfig(element_budget=element_budget, chunk_size=chunk_size, dense_rank=dense_rank)
    kernel = select_kernel(backend, y.device, config)
    if out is None:
        out = torch.empty(H, T, T, dtype=torch.float32, device=y.device)
    elif out.shape != (H, T, T) or out.dtype != torch.float32 or out.device != y.device:
        raise InputError(f"out must be a float32 [H, T, T] = {[H, T, T]} tensor on {y.device}; got "
                         f"{out.dtype} {list(out.shape)} on {out.device}")
    heads = kernel.head_outputs(values[None], w_o)
    y = y.float()
    if kernel.name == "cpu":  # one chunk: the compiled loop needs no bound on its work memory
        dest = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype)
        kernel.sub_edge_block(y[None], probs.float()[None], heads, 0, out=dest[None])
        return dest if dest is out else out.copy_(dest)
    C = kernel.rows_per_block(1, H, T, config.budget(y.device))
    out.zero_()
    for p0 in range(0, T, C):
        p1 = min(T, p0 + C)
        # positions p0..p1-1 only read sources j < p1: the chunk is [H, C, p1], not [H, C, T]
        out[:, p0:p1, :p1] = kernel.sub_edge_block(y[None, p0:p1], probs[None, :, p0:p1, :p1], heads, p0)[0]
    return out


def normalise(sub_prox: torch.Tensor | None, direct_prox: torch.Tensor, *, inplace: bool = False) -> NodeImportances:
    """Divide each node's proximities by their sum; nodes whose parts all have proximity 0 get all 0.

    sub_prox: ``[H, T, T]`` or None; direct_prox: ``[K, T]``. ``inplace`` scales ``sub_prox`` itself
    (no second ``[H, T, T]`` tensor at long contexts).
    """
    total = direct_prox.sum(0)  # [T]
    if sub_prox is not None:
        total = total + sub_prox.sum(dim=(0, 2))
    safe = torch.where(total > 0, total, torch.ones_like(total))
    scale = torch.where(total > 0, 1.0 / safe, torch.zeros_like(total))  # [T]
    if sub_prox is None:
        attn = None
    elif inplace:
        attn = sub_prox.mul_(scale[None, :, None])
    else:
        attn = sub_prox * scale[None, :, None]
    return NodeImportances(attn=attn, direct=direct_prox * scale[None, :])


def attention_node(
    y: torch.Tensor,
    direct_parts: torch.Tensor,
    probs: torch.Tensor,
    values: torch.Tensor,
    w_o: torch.Tensor,
    *,
    chunk_size: int | None = None,
    element_budget: int | None = None,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> NodeImportances:
    """Importances for nodes made of attention sub-edges plus direct parts.

    y ``[T, d]``; direct_parts ``[K, T, d]`` (residual; for parallel blocks also the FFN output);
    probs ``[H, T, T]``; values ``[H_kv, T, dh]``; w_o ``[H, dh, d]``. With ``out`` (float32
    ``[H, T, T]``) the sub-edge importances are written there and ``.attn`` is ``out``.
    """
    sub = sub_edge_proximity(y, probs, values, w_o, chunk_size=chunk_size, element_budget=element_budget,
                             backend=backend, out=out)
    kernel = select_kernel(backend, y.device)
    work = sub if sub.is_contiguous() else sub.contiguous()
    direct = kernel.finish_block(work[None], y.float()[None], [z[None] for z in direct_parts], 0)[:, 0]
    if work is not sub:
        sub.copy_(work)
    return NodeImportances(attn=sub, direct=direct)


def direct_node(y: torch.Tensor, direct_parts: torch.Tensor, *, backend: str = "auto") -> NodeImportances:
    """Importances for nodes made only of direct parts ``[K, T, d]`` (e.g. residual + FFN)."""
    kernel = select_kernel(backend, y.device)
    return NodeImportances(attn=None, direct=kernel.direct_node(y.float(), list(direct_parts)))
