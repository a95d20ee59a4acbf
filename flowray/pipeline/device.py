"""The device side of a map-stage worker: the model, and the one thread that runs it.

A worker overlaps its host work (tokens, words, POS tags, Arrow rows, Parquet) with the model's forward
passes. ``DeviceQueue`` runs the batches on a thread of its own, one at a time and the oldest shard's first,
while the threads that submitted them prepare the next batches and turn finished ones into rows. The
forward pass releases the GIL while it computes (torch kernels, the compiled CPU kernel, CUDA waits).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from concurrent.futures import Future

from flowray.config import JobConfig


class Clock:
    """Named laps of a start-up, in seconds."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 3)
        self.last = now


class ModelStage:
    """The model, loaded once; a call gives the streamed statistics of one batch (one padded forward pass).

    ``tokenizer``, ``shape`` (the adapter's: layers, heads, context) and ``startup`` (seconds per start-up
    step) are what the host side reads. Another stage with the same call (a benchmark's stand-in for the
    device) can take its place in ``FlowWorker``. ``lm``: a ``LoadedModel`` already in memory (a
    benchmark's random-weight model) instead of loading ``config.model``.
    """

    def __init__(self, config: JobConfig, lm=None):
        clock = Clock()
        import torch

        clock.lap("import_torch_s")
        import transformers  # noqa: F401 - timed on its own: most of a model load is importing its code

        from flowray.kernels import cpu_loops
        from flowray.models.loading import load_model

        clock.lap("import_transformers_s")
        if not config.gpus_per_actor:
            torch.set_num_threads(max(1, int(config.cpus_per_actor)))
        self.taus, self.backend = tuple(config.tau), config.backend
        self.lm = lm if lm is not None else load_model(config.model, dtype=config.dtype, device=config.device,
                                                       trust_remote_code=config.trust_remote_code)
        clock.lap("load_model_s")
        self.tokenizer = self.lm.tokenizer
        self.shape = self.lm.adapter.shape
        if next(self.lm.model.parameters()).device.type == "cpu":
            cpu_loops.warm_up(torch.get_num_threads())  # compiled or cached kernels, before the first shard
        clock.lap("compile_kernels_s")
        self.startup = clock.laps

    def __call__(self, sequences: list[list[int]], words: list, sources: list) -> list:
        """``PredictionStats`` of each sequence (token ids, BOS first); ``words``: one ``(word_index,
        first_subword)`` pair per sequence; ``sources``: one ``(query, positions)`` or None per sequence."""
        import torch

        from flowray.stats import prediction_stats_batch
        from flowray.tables import SILENT_INFLUENCE

        return prediction_stats_batch(self.lm, [torch.tensor([ids]) for ids in sequences], self.taus, words=words,
                                      sources=sources, active_above=SILENT_INFLUENCE, backend=self.backend)


class DeviceQueue:
    """One thread that runs submitted calls one at a time, lowest ``order`` first (e.g. ``(shard, batch)``),
    so that with several shards in flight the oldest finishes first and the newer ones' batches fill the
    device while the oldest writes its files."""

    def __init__(self, name: str = "flowray-device"):
        self._name = name
        self._heap: list = []
        self._ready = threading.Condition()
        self._tie = itertools.count()
        self._thread: threading.Thread | None = None

    def submit(self, order, fn, *args) -> Future:
        future: Future = Future()
        with self._ready:
            heapq.heappush(self._heap, (order, next(self._tie), future, fn, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._ready.notify()
        return future

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._heap:
                    self._ready.wait()
                _, _, future, fn, args = heapq.heappop(self._heap)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the thread that waits for it
                future.set_exception(exc)
