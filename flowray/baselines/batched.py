"""The comparison's routes, computed the way the corpus job computes them, and where their time goes.

``last_routes`` runs ``flowray.stats.prediction_stats_batch`` (one padded forward pass under the capture,
the streamed importances, the last position's route: ``predictions="last"``) on a batch of prompts: the
last position's route heads and its heads' importances. No route code of its own: the corpus job's.

``SplitClock`` times the phases of those calls from the outside, with hooks on the model's top module:
setup before the forward pass (input checks, padding, per-sequence state: Python), the forward pass with
the capture's importances inside it, and what follows it (the routes, the copies to the host).
A plain forward pass of the same batch, timed beside it (``plain_forward``), splits the middle part into
the forward pass itself and the importances. Shapes: ``T`` tokens, ``L`` layers, ``H`` heads.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from flowray.api import pad_sequences, padded_forward_inputs
from flowray.stats import prediction_stats_batch

SPLIT_PARTS = ("setup", "forward_and_importances", "routes")


@dataclass(frozen=True)
class LastRoute:
    """The last position's route of one prompt, from the corpus job's statistics."""

    heads: np.ndarray  # [k] flat head ids layer * H + head in the route, ascending
    importance: np.ndarray  # [L*H] each head's summed sub-edge importance at the last position
    n_tokens: int

    def head_pairs(self, n_heads: int) -> list[tuple[int, int]]:
        return [(int(i) // n_heads, int(i) % n_heads) for i in self.heads]


@dataclass
class SplitClock:
    """Wall and CPU seconds of ``SPLIT_PARTS`` accumulated over ``last_routes`` calls."""

    wall: dict = field(default_factory=lambda: dict.fromkeys(SPLIT_PARTS, 0.0))
    cpu: dict = field(default_factory=lambda: dict.fromkeys(SPLIT_PARTS, 0.0))

    def add(self, marks: list[tuple[float, float]]) -> None:
        """``marks``: (wall, cpu) at the call's start, the forward pass's start and end, the call's end."""
        for part, (a, b) in zip(SPLIT_PARTS, zip(marks, marks[1:])):
            self.wall[part] += b[0] - a[0]
            self.cpu[part] += b[1] - a[1]


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


@contextlib.contextmanager
def _forward_marks(hf_model, marks: list):
    """Within the block, the top module's forward pass appends ``_now()`` as it starts and as it ends."""
    handles = [hf_model.register_forward_pre_hook(lambda *_: marks.append(_now())),
               hf_model.register_forward_hook(lambda *_: marks.append(_now()))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def last_routes(lm, ids_list: list, tau: float, clock: SplitClock | None = None) -> list[LastRoute]:
    """The last-position route of each ``[T_i]`` prompt, from one ``prediction_stats_batch`` call.

    ``clock``: where to add the call's phases (setup, forward pass with importances, routes).
    """
    L, H = lm.adapter.shape.n_layers, lm.adapter.shape.n_heads
    marks = [_now()]
    with _forward_marks(lm.model, marks) if clock is not None else contextlib.nullcontext():
        # what the comparison reads: the routes and importances, the last position's prediction (no other
        # row through the output embedding), no tau-pruned silence
        stats = prediction_stats_batch(lm, [ids[None] for ids in ids_list], (tau,), predictions="last", active_above=None)
    out = [LastRoute(heads=st.route_heads[tau][-1], importance=st.components[-1, : L * H], n_tokens=st.n_tokens)
           for st in stats]
    if clock is not None:
        marks.append(_now())
        clock.add(marks)
    return out


@torch.inference_mode()
def plain_forward(lm, ids_list: list) -> None:
    """One plain forward pass (the model's own attention, logits at the last position, like the baselines')
    of the padded batch ``last_routes`` builds from the same prompts."""
    input_ids, attention_mask = pad_sequences(lm, [ids[None] for ids in ids_list], "right")
    _, _, kwargs = padded_forward_inputs(lm.model, lm.adapter, input_ids, attention_mask)
    lm.model(**kwargs, logits_to_keep=1)
