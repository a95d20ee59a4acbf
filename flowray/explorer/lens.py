"""The logit lens of every node (paper section 5's "what does this residual predict"), at export, in torch.

Each residual stream a route node stands for (the embedding, x^{lA} after block l's attention, x^l after
block l) goes through the model's final norm and unembedding, exactly as the last block's output does to
give the logits. The adapter names both (``final_norm()``, ``unembedding()``), so this module knows no HF
module path.
"""

from __future__ import annotations

import numpy as np
import torch

from flowray.capture import capture_layers


@torch.no_grad()
def logit_lens(lm, input_ids: torch.Tensor, k: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` next tokens of every node's residual, and of the model's own logits.

    Args:
        lm: a ``flowray.LoadedModel``.
        input_ids: ``[1, T]``.
    Returns:
        ``lens_ids, lens_probs`` ``[N, T, k]`` (levels as in ``flowray.explorer.data``) and
        ``top_ids, top_probs`` ``[T, k]`` from the forward pass's logits.
    """
    model, adapter = lm.model, lm.adapter
    s = adapter.shape
    norm = adapter.final_norm()
    w_u = adapter.unembedding().detach()  # [V, d]
    bias = getattr(model.get_output_embeddings(), "bias", None)
    T = int(input_ids.shape[1])
    n_levels = s.n_layers + 1 if s.parallel else 2 * s.n_layers + 1
    ids = np.zeros((n_levels, T, k), dtype=np.int32)
    probs = np.zeros((n_levels, T, k), dtype=np.float32)

    def lens(level: int, x: torch.Tensor) -> None:  # x [1, T, d]
        logits = norm(x)[0].float() @ w_u.float().T  # [T, V]
        if bias is not None:
            logits = logits + bias.float()
        p, i = logits.softmax(-1).topk(k, dim=-1)  # [T, k]
        ids[level], probs[level] = i.cpu().numpy(), p.cpu().numpy()

    def consume(rec) -> None:
        l = rec.layer
        if l == 0:
            lens(0, rec.inputs)
        if s.parallel:
            lens(l + 1, rec.outputs)
        else:
            lens(2 * l + 1, rec.inputs + rec.attn_out)  # x^{lA}
            lens(2 * l + 2, rec.outputs)

    device = lm.device
    with capture_layers(model, adapter, consume, reuse_probs=True):
        logits = model(input_ids=input_ids.to(device), use_cache=False).logits[0].float()  # [T, V]
    p, i = logits.softmax(-1).topk(k, dim=-1)
    return ids, probs, i.cpu().numpy().astype(np.int32), p.cpu().numpy().astype(np.float32)
