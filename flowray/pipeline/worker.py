"""The map stage's workers: plain classes, model loaded once in ``__init__``, batches in, columns out.

``FlowWorker.process`` turns a batch of texts into prediction rows and error rows; it knows nothing of Ray
and a unit test calls it directly. Its device batches run on a thread of their own (``device.DeviceQueue``)
while the calling thread tokenises and aligns the next batches and tags and builds the rows of finished
ones. ``ShardWorker`` is what the Ray actor pool runs: one shard per call, outputs written whole by the
worker itself, then a ``done/<shard>.json`` marker — the commit point resume relies on. A GPU actor takes
``SHARDS_IN_FLIGHT`` calls at once (see ``job``): one shard's Parquet encoding and writes, which release the
GIL, overlap the other shards' forward passes.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from flowray.config import JobConfig
from flowray.errors import FlowrayError, InputError, MissingDependencyError
from flowray.pipeline.commit import commit_shard, read_shard_input
from flowray.pipeline.device import Clock, DeviceQueue, ModelStage
from flowray.pipeline.storage import StorageError
from flowray.tables import ERRORS, TextRows, predictions_schema

log = logging.getLogger(__name__)
# Device batches submitted ahead of the one whose rows are being built: one runs while the next waits, so
# the device never waits for the host between two batches of a shard.
AHEAD = 2
# Shards a GPU actor holds at once (its concurrent calls). A shard's tail after its last batch (rows, Parquet
# encoding, checksums, writes, then tokenising the next shard) costs more host time per prediction than one
# other shard's batches take on the device (~65 vs 55 us at the 7B shape), so with two in flight the device
# waits for it; with four, three shards' batches cover it (bench/actor_host.py --calls 2,4).
SHARDS_IN_FLIGHT = 4


@dataclass
class _Prepared:
    index: int  # the doc's place in the input (rows are written in input order)
    doc: dict
    ids: list[int]  # kept token ids (the BOS first when there is one)
    next_ids: list[int | None]
    words: object  # flowray.text.Alignment over the kept tokens + one look-ahead token
    target: list[bool]  # counted in the activation / importance tables
    text: str
    language: str
    source: tuple[int, list[int]] | None = None  # tasks: (last position, source positions), see flowray.tasks


class FlowWorker:
    """Texts -> one row per prediction (``tables.predictions_schema``) + one row per failed text (``ERRORS``).

    Configured by the validated ``JobConfig`` alone (model, dtype, device, taus, max_tokens, truncate,
    batch_size, per-actor CPUs); it declares no defaults of its own. ``stage``: the device side (default:
    ``ModelStage(config)``, the model); a benchmark passes a stand-in of the same interface.
    """

    def __init__(self, config: JobConfig, *, stage=None):
        self.stage = stage if stage is not None else ModelStage(config)
        clock = Clock()
        self.config = config
        self.tokenizer = self.stage.tokenizer
        self.taus = tuple(config.tau)
        self.schema = predictions_schema(self.taus)
        self.shape = self.stage.shape
        self.bos = None
        if config.prepend_bos:
            from flowray.text import document_start

            self.bos = document_start(self.tokenizer)
        self.pos_tagging = self._tagger()
        clock.lap("load_tagger_s")
        self.startup = {**self.stage.startup, **clock.laps}  # seconds per start-up step, in every shard's marker
        self._decoded: dict[int, str] = {}  # token id -> its text, decoded once per actor
        self._tokenizing = threading.Lock()  # a fast tokenizer must not be entered by two threads at once
        self.device = DeviceQueue()
        self._shards = itertools.count()  # the device's order: an older call's batches first

    @property
    def lm(self):
        """The loaded model (``ModelStage``'s ``LoadedModel``)."""
        return self.stage.lm

    def _tagger(self):
        from flowray.text import universal_tagger

        try:
            return universal_tagger()
        except MissingDependencyError as exc:
            log.warning("POS tags disabled (pos/next_pos will be null): %s", exc)
            return None

    def _decode(self, ids) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            text = self._decoded.get(i)
            if text is None:
                text = self._decoded[i] = self.tokenizer.decode([i])
            out.append(text)
        return out

    # --- per text --------------------------------------------------------------------------------
    def _prepare(self, index: int, doc: dict, steps: dict | None = None) -> _Prepared:
        """Tokens (only as many as are kept, plus the next one) and their words; no POS tags yet."""
        cpu = time.thread_time()
        from flowray.text import UniversalTagger, align_tokens, encode_kept

        text = doc.get("text")
        if not isinstance(text, str):
            raise InputError(f"text is not a string (undecodable or missing); got {type(text).__name__}")
        if not text.strip():
            raise InputError("text is empty or only whitespace")
        max_tokens = self.config.max_tokens
        # the whole text when its length matters (truncate: false) or a task checks where it ends
        need = None if doc.get("is_task") or not self.config.truncate else max_tokens + 1
        with self._tokenizing:
            ids, offsets = encode_kept(self.tokenizer, text, need)
        cpu = _add(steps, "tokenise", cpu)
        if not ids:
            raise InputError("text encodes to no tokens")
        if len(ids) > max_tokens and not self.config.truncate:
            raise InputError(f"text is {len(ids)} tokens long, more than max_tokens={max_tokens} "
                             "(truncate: false)")
        lead = 0 if self.bos is None else 1
        if lead:  # the BOS belongs to no word: its span is empty
            ids, offsets = [self.bos.token_id, *ids], [(0, 0), *offsets]
        context = self.shape.max_positions
        keep = min(len(ids), max_tokens + lead, context or len(ids))
        if keep <= lead:
            raise InputError(f"the model's context ({context} positions) leaves no room for the text after the BOS")
        next_ids = ids[1 : keep + 1] + [None] * (keep + 1 - len(ids))
        target = [p >= lead for p in range(keep)]
        source = None
        if doc.get("is_task"):
            meta = json.loads(doc.get("meta") or "{}")
            target, source = self._task_rows(meta, ids[:keep], offsets, next_ids, lead)
        look = min(len(ids), keep + 1)  # words of the kept tokens and of the next one
        lookahead = None if self.pos_tagging is None else getattr(self.pos_tagging, "lookahead", UniversalTagger.lookahead)
        words = align_tokens(text, offsets[:look], lookahead=lookahead)
        _add(steps, "align", cpu)
        return _Prepared(index=index, doc=doc, ids=ids[:keep], next_ids=next_ids, words=words, target=target,
                         text=text, language=doc.get("language", "en"), source=source)

    def _task_rows(self, meta: dict, ids: list[int], offsets, next_ids: list, lead: int):
        """A task text's target rows (and sub-edge source): see flowray.tasks.

        Texts with ``prompt_chars`` (arithmetic) hold the prompt and the whole answer: every position whose
        next token is part of the answer is a target (each generation step). Otherwise the text is the
        prompt and its last position, whose next token is the answer, is the one target.
        ``source_chars`` marks the token(s) whose sub-edges to the last prompt position are measured.
        """
        T = len(ids)
        if offsets[T - 1][1] < max(e for _, e in offsets):
            raise InputError(f"task text is {len(offsets) - lead} tokens long, more than the {T - lead} kept "
                             "(max_tokens or the model's context): its prediction under study would be cut off; "
                             "raise max_tokens")
        if isinstance(meta.get("prompt_chars"), int):
            cut = meta["prompt_chars"]
            target = [p >= lead and p + 1 < T and offsets[p + 1][0] >= cut for p in range(T)]
            if not any(target):
                raise InputError(f"task text: no answer token starts at character {cut} (the end of the prompt) "
                                 f"within the {T} kept tokens; raise max_tokens")
        else:
            target = [False] * (T - 1) + [T - 1 >= lead]
            next_ids[T - 1] = self._answer_id(ids, meta)
        source = None
        span = meta.get("source_chars")
        if span is not None:
            last = target.index(True)  # the prediction right after the prompt
            start, end = span
            positions = [p for p in range(lead, last + 1) if offsets[p][0] < end and offsets[p][1] > start]
            source = (last, positions) if positions else None
        return target, source

    def _answer_id(self, ids: list[int], meta: dict) -> int | None:
        """A task's expected next token: the answer as a continuation of the prompt (one token)."""
        if isinstance(meta.get("answer_token_id"), int):  # set by flowray.tasks when it had the tokenizer
            return meta["answer_token_id"]
        answer = meta.get("answer")
        if not answer:
            return None
        with self._tokenizing:
            cont = self.tokenizer.encode(answer, add_special_tokens=False)
        return int(cont[0]) if len(cont) == 1 else None

    @staticmethod
    def _word_arrays(prep: _Prepared) -> tuple[np.ndarray, np.ndarray]:
        T = len(prep.ids)
        return np.asarray(prep.words.word_index[:T]), np.asarray(prep.words.first_subword[:T], dtype=bool)

    def _pos(self, prep: _Prepared) -> list[str | None]:
        """The universal POS tag of each token's word (the kept tokens and the next one)."""
        from flowray.text import tag_tokens

        if self.pos_tagging is None:
            return [None] * len(prep.words.word_index)
        return tag_tokens(prep.text, prep.words, language=prep.language, tagger=self.pos_tagging)

    def _rows(self, prep: _Prepared, st, pos: list[str | None]) -> TextRows:
        doc, T = prep.doc, len(prep.ids)
        word_index, first = self._word_arrays(prep)
        is_task = bool(doc.get("is_task"))
        return TextRows(
            domain=doc["domain"], shard_id=doc["shard_id"], doc_id=doc["doc_id"],
            token_ids=np.asarray(prep.ids), tokens=self._decode(prep.ids),
            next_ids=prep.next_ids,
            next_tokens=[None if i is None else self._decode([i])[0] for i in prep.next_ids],
            predicted_ids=st.predicted_ids,
            predicted_tokens=self._decode(st.predicted_ids),
            word_index=word_index, first_subword=first,
            pos=pos[:T],
            next_pos=[pos[p + 1] if p + 1 < len(pos) and prep.next_ids[p] is not None and
                      not (is_task and p == T - 1) else None for p in range(T)],
            target=np.asarray(prep.target, dtype=bool),
            components=st.components,
            prev_share=st.prev_share, same_word_share=st.same_word_share,
            route_heads=dict(st.route_heads), route_ffn=dict(st.route_ffn),
            pruned_heads=dict(st.pruned_heads), bos=self.bos is not None,
            source_row=None if prep.source is None else prep.source[0], source_edges=st.source_edges,
        )

    # --- batches ---------------------------------------------------------------------------------
    def _stats(self, group: list[_Prepared]) -> list:
        return self.stage([p.ids for p in group], [self._word_arrays(p) for p in group], [p.source for p in group])

    def _device_batch(self, group: list[_Prepared]) -> tuple[list, float, float]:
        """On the device thread: ``([(prep, stats or the exception)], wall s, this thread's CPU s)``."""
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            done = list(zip(group, self._stats(group)))
        except Exception:  # noqa: BLE001 - retry one by one so only the culprit fails
            done = []
            for prep in group:
                try:
                    done.append((prep, self._stats([prep])[0]))
                except Exception as exc:  # noqa: BLE001
                    done.append((prep, exc))
        return done, time.perf_counter() - wall, time.thread_time() - cpu

    def process(self, docs: list[dict], on_batch=None, steps: dict | None = None) -> tuple[pa.Table, pa.Table]:
        """Every doc ends up exactly once: as prediction rows or as one error row, both in input order.

        Texts are bucketed by length (sorted, then ``batch_size`` at a time) so that padding stays small;
        one forward pass per batch, on the device thread, up to ``AHEAD`` batches ahead of the rows being
        built here. ``on_batch()``, when given, runs after each batch's rows (progress, tests). ``steps``,
        when given, gains seconds per step: this thread's CPU time in ``tokenise``, ``align``, ``pos`` and
        ``rows``; the device thread's wall and CPU time in ``device`` and ``device_cpu``.
        """
        order = next(self._shards)
        tables, errors, ready = [], [], []
        for index, doc in enumerate(docs):
            try:
                ready.append(self._prepare(index, doc, steps))
            except Exception as exc:  # noqa: BLE001 - any failure of one text becomes data, not a crash
                errors.append((index, _error_row(doc, exc)))
        ready.sort(key=lambda p: len(p.ids))
        size = self.config.batch_size
        pending: deque = deque()
        for k, start in enumerate(range(0, len(ready), size)):
            group = ready[start : start + size]
            pending.append(self.device.submit((order, k), self._device_batch, group))
            if len(pending) > AHEAD:
                self._emit(pending.popleft(), tables, errors, steps, on_batch)
        while pending:
            self._emit(pending.popleft(), tables, errors, steps, on_batch)
        tables.sort(key=lambda item: item[0])
        errors.sort(key=lambda item: item[0])
        predictions = pa.concat_tables([t for _, t in tables]) if tables else self.schema.empty_table()
        return predictions, pa.Table.from_pylist([e for _, e in errors], schema=ERRORS)

    def _emit(self, future, tables: list, errors: list, steps: dict | None, on_batch) -> None:
        """A finished device batch's rows: POS tags, Arrow columns (each text's failure becomes its error row)."""
        done, wall, device_cpu = future.result()
        if steps is not None:
            steps["device"] = steps.get("device", 0.0) + wall
            steps["device_cpu"] = steps.get("device_cpu", 0.0) + device_cpu
        for prep, st in done:
            if isinstance(st, Exception):
                errors.append((prep.index, _error_row(prep.doc, st)))
                continue
            try:
                cpu = time.thread_time()
                pos = self._pos(prep)
                cpu = _add(steps, "pos", cpu)
                tables.append((prep.index, self._rows(prep, st, pos).table(self.schema)))
                _add(steps, "rows", cpu)
            except Exception as exc:  # noqa: BLE001
                errors.append((prep.index, _error_row(prep.doc, exc)))
        if on_batch is not None:
            on_batch()


def _add(steps: dict | None, name: str, since: float) -> float:
    """Add this thread's CPU seconds since ``since`` to ``steps[name]`` (when steps are kept); return now."""
    now = time.thread_time()
    if steps is not None:
        steps[name] = steps.get(name, 0.0) + now - since
    return now


def _error_row(doc: dict, exc: Exception) -> dict:
    text = doc.get("text")
    expected = isinstance(exc, FlowrayError)
    return {
        "domain": str(doc.get("domain")), "shard_id": str(doc.get("shard_id")), "doc_id": str(doc.get("doc_id")),
        "error_type": type(exc).__name__, "error": str(exc) or type(exc).__name__,
        "traceback": None if expected else "".join(traceback.format_exception(exc, limit=8)),
        "n_chars": len(text) if isinstance(text, str) else None,
    }


class ShardWorker:
    """The actor class of the Ray pipeline: one shard id in, its outputs written, a summary row out (a
    storage fault, such as a full disk, comes back in the row's ``fault`` for the driver to report)."""

    def __init__(self, *, run_uri: str, config: JobConfig, submitted: float | None = None):
        from flowray.pipeline.storage import Storage

        started = time.time()
        t0 = time.perf_counter()
        self.storage = Storage(run_uri)
        self.flow = self.make_flow(config)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        # the map stage's start (driver clock) to this constructor: Ray starting the worker process
        ray_start = None if submitted is None else round(max(0.0, started - submitted), 3)
        self.startup = {"ray_worker_start_s": ray_start, **self.flow.startup,
                        "init_s": round(time.perf_counter() - t0, 3)}
        log.info("actor %s started in %.1f s: %s", self.name, self.startup["init_s"], self.startup)

    def make_flow(self, config: JobConfig) -> FlowWorker:
        """The worker each shard goes through (a benchmark's subclass gives it a stand-in device stage)."""
        return FlowWorker(config)

    def __call__(self, batch: dict) -> dict:
        out = {k: [] for k in ("shard_id", "texts", "predictions", "errors", "seconds", "worker", "fault")}
        for shard_id in batch["shard_id"]:
            shard_id = str(shard_id)
            t0 = time.perf_counter()
            config = self.flow.config
            docs, identity = read_shard_input(self.storage, shard_id, config.content_hash(), config.texts_per_shard)
            steps: dict[str, float] = {}
            predictions, errors = self.flow.process(docs, steps=steps)
            seconds = time.perf_counter() - t0
            summary = {"shard_id": shard_id, "texts": len(docs), "predictions": predictions.num_rows,
                       "errors": errors.num_rows, "seconds": seconds, "worker": self.name,
                       "n_layers": self.flow.shape.n_layers, "n_heads": self.flow.shape.n_heads,
                       "pos_tagging": self.flow.pos_tagging is not None, "startup": self.startup,
                       "bos": None if self.flow.bos is None else self.flow.bos.to_dict(),
                       "steps_s": {k: round(v, 4) for k, v in steps.items()}}
            try:
                commit_shard(self.storage, shard_id, predictions, errors, summary, identity)  # tables, then the marker
            except StorageError as exc:  # disk full, read-only: data for the driver to report, not a crash
                summary["fault"] = str(exc)
            for k in out:
                out[k].append(summary.get(k))
        return out
