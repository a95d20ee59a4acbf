"""What every intervention shares: input checks, batching, the last-position logits and the logit difference.

Shapes: ``B`` batch rows, ``T`` tokens, ``V`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from flowray.errors import InputError


def check_ids(input_ids, what: str = "input_ids") -> torch.Tensor:
    """``[B, T]`` integer token ids as int64, or an InputError naming the shape or dtype that arrived."""
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(np.asarray(input_ids))
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise InputError(
            f"{what} must have shape [B, T] (prompts of one length); got shape {tuple(input_ids.shape)}"
        )
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"{what} must be integer token ids; got dtype {input_ids.dtype}")
    return input_ids.long()


def check_targets(ids, n: int, what: str) -> torch.Tensor:
    """``[n]`` token ids, one per prompt (the answer or the wrong token of the logit difference)."""
    t = torch.as_tensor(np.asarray(ids)).long().reshape(-1)
    if t.numel() != n:
        raise InputError(f"{what} must hold one token id per prompt ({n}); got {t.numel()}")
    return t


def check_twins(clean_ids, corrupt_ids, answer_ids, wrong_ids):
    """``[P, T]`` clean and corrupted ids of equal shape and ``[P]`` answer / wrong ids, checked."""
    clean_ids = check_ids(clean_ids, "clean_ids")
    corrupt_ids = check_ids(corrupt_ids, "corrupt_ids")
    if clean_ids.shape != corrupt_ids.shape:
        raise InputError(
            f"clean_ids and corrupt_ids must have the same shape [P, T] (twins of equal token length); "
            f"got {tuple(clean_ids.shape)} and {tuple(corrupt_ids.shape)}"
        )
    P = clean_ids.shape[0]
    return clean_ids, corrupt_ids, check_targets(answer_ids, P, "answer_ids"), check_targets(wrong_ids, P, "wrong_ids")


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def last_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, V]`` float32 logits at the last position (only that position goes through the unembedding)."""
    out = model(input_ids=input_ids.to(model_device(model)), use_cache=False, logits_to_keep=1)
    return out.logits[:, -1].float()


def logit_diff(logits: torch.Tensor, answer_ids: torch.Tensor, wrong_ids: torch.Tensor) -> torch.Tensor:
    """``[B]`` logit(answer) - logit(wrong) from ``[B, V]`` last-position logits."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, answer_ids.to(logits.device)] - logits[rows, wrong_ids.to(logits.device)]


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Slices of at most ``batch_size`` rows that cover ``range(n)`` in order."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="fwd", disable=not enabled, leave=False)


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer (rows per forward pass); got {batch_size!r}")
    return batch_size
