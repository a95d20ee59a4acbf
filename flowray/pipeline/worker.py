"""The map stage's workers: plain classes, model loaded once in ``__init__``, batches in, columns out.

``FlowWorker.process`` turns a batch of texts into prediction rows and error rows; it knows nothing of Ray
and a unit test calls it directly. ``ShardWorker`` is what the Ray actor pool runs: one shard per call, outputs written
whole by the worker itself, then a ``done/<shard>.json`` marker — the commit point resume relies on.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import traceback
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from flowray.errors import FlowrayError, InputError, MissingDependencyError
from flowray.pipeline.commit import commit_shard
from flowray.tables import ERRORS, TextRows, head_shares, predictions_schema

log = logging.getLogger(__name__)


@dataclass
class _Prepared:
    doc: dict
    ids: list[int]  # kept token ids
    next_ids: list[int | None]
    words: object  # flowray.text.TokenWords over the kept tokens + one look-ahead token


class FlowWorker:
    """Texts -> one row per prediction (``tables.predictions_schema``) + one row per failed text (``ERRORS``)."""

    def __init__(
        self,
        *,
        model: str,
        taus,
        max_tokens: int,
        truncate: bool = True,
        batch_size: int = 4,
        dtype: str = "float32",
        device: str = "auto",
        trust_remote_code: bool = False,
        torch_threads: int | None = None,
    ):
        import torch

        from flowray.models.loading import load_model

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        self.tokenizer = self.lm.tokenizer
        self.taus = tuple(taus)
        self.max_tokens = max_tokens
        self.truncate = truncate
        self.batch_size = batch_size
        self.schema = predictions_schema(self.taus)
        self.shape = self.lm.adapter.shape
        self.pos_tagging = self._tagger()

    def _tagger(self):
        from flowray.text import universal_tagger

        try:
            return universal_tagger()
        except MissingDependencyError as exc:
            log.warning("POS tags disabled (pos/next_pos will be null): %s", exc)
            return None

    # --- per text --------------------------------------------------------------------------------
    def _prepare(self, doc: dict) -> _Prepared:
        from flowray.text import align_words

        text = doc.get("text")
        if not isinstance(text, str):
            raise InputError(f"text is not a string (undecodable or missing); got {type(text).__name__}")
        if not text.strip():
            raise InputError("text is empty or only whitespace")
        enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        if not ids:
            raise InputError("text encodes to no tokens")
        if len(ids) > self.max_tokens and not self.truncate:
            raise InputError(f"text is {len(ids)} tokens long, more than max_tokens={self.max_tokens} "
                             "(truncate: false)")
        context = self.shape.max_positions
        keep = min(len(ids), self.max_tokens, context or len(ids))
        next_ids = ids[1 : keep + 1] + [None] * (keep + 1 - len(ids))
        if doc.get("is_task"):
            next_ids[keep - 1] = self._answer_id(ids[:keep], json.loads(doc.get("meta") or "{}"))
        tagger = self.pos_tagging if self.pos_tagging is not None else (lambda words: [None] * len(words))
        look = min(len(ids), keep + 1)  # words of the kept tokens and of the next one
        words = align_words(text, offsets[:look], language=doc.get("language", "en"), tagger=tagger)
        return _Prepared(doc=doc, ids=ids[:keep], next_ids=next_ids, words=words)

    def _answer_id(self, ids: list[int], meta: dict) -> int | None:
        """A task's expected next token: the answer as a continuation of the prompt (one token)."""
        if isinstance(meta.get("answer_token_id"), int):  # set by flowray.tasks when it had the tokenizer
            return meta["answer_token_id"]
        answer = meta.get("answer")
        if not answer:
            return None
        cont = self.tokenizer.encode(answer, add_special_tokens=False)
        return int(cont[0]) if len(cont) == 1 else None

    def _rows(self, prep: _Prepared, imp) -> TextRows:
        from flowray.routes import route_masks

        doc, T = prep.doc, len(prep.ids)
        L, H = imp.n_layers, imp.n_heads
        w = prep.words
        word_index = np.asarray(w.word_index[:T])
        first = np.asarray(w.first_subword[:T], dtype=bool)
        total, prev, same = head_shares(imp.attn, word_index, first)
        target = np.zeros(T, dtype=bool)
        if doc.get("is_task"):
            target[-1] = True
        else:
            target[:] = True
        rows = TextRows(
            domain=doc["domain"], shard_id=doc["shard_id"], doc_id=doc["doc_id"],
            token_ids=np.asarray(prep.ids), tokens=list(imp.tokens),
            next_ids=prep.next_ids,
            next_tokens=[None if i is None else self.tokenizer.decode([i]) for i in prep.next_ids],
            predicted_ids=imp.predicted_ids,
            predicted_tokens=[self.tokenizer.decode([int(i)]) for i in imp.predicted_ids],
            word_index=word_index, first_subword=first,
            pos=list(w.pos[:T]),
            next_pos=[w.pos[p + 1] if p + 1 < len(w.pos) and prep.next_ids[p] is not None and
                      not (doc.get("is_task") and p == T - 1) else None for p in range(T)],
            target=target,
            components=imp.component_importance(),
            prev_share=prev, same_word_share=same,
        )
        for tau in self.taus:
            masks = route_masks(imp, tau)
            flat = masks.heads.reshape(T, L * H)
            rows.route_heads[tau] = [np.flatnonzero(flat[p]) for p in range(T)]
            rows.route_ffn[tau] = [np.flatnonzero(masks.ffn[p]) for p in range(T)]
        return rows

    # --- batches ---------------------------------------------------------------------------------
    def process(self, docs: list[dict]) -> tuple[pa.Table, pa.Table]:
        """Every doc ends up exactly once: as prediction rows or as one error row."""
        import torch

        from flowray.api import edge_importances_batch

        tables, errors, ready = [], [], []
        for doc in docs:
            try:
                ready.append(self._prepare(doc))
            except Exception as exc:  # noqa: BLE001 - any failure of one text becomes data, not a crash
                errors.append(_error_row(doc, exc))
        for start in range(0, len(ready), self.batch_size):
            group = ready[start : start + self.batch_size]
            try:
                imps = edge_importances_batch(self.lm, [torch.tensor([p.ids]) for p in group])
                done = list(zip(group, imps))
            except Exception:  # noqa: BLE001 - retry one by one so only the culprit fails
                done = []
                for prep in group:
                    try:
                        done.append((prep, edge_importances_batch(self.lm, [torch.tensor([prep.ids])])[0]))
                    except Exception as exc:  # noqa: BLE001
                        errors.append(_error_row(prep.doc, exc))
            for prep, imp in done:
                try:
                    tables.append(self._rows(prep, imp).table(self.schema))
                except Exception as exc:  # noqa: BLE001
                    errors.append(_error_row(prep.doc, exc))
        predictions = pa.concat_tables(tables) if tables else self.schema.empty_table()
        return predictions, pa.Table.from_pylist(errors, schema=ERRORS)


def _error_row(doc: dict, exc: Exception) -> dict:
    text = doc.get("text")
    expected = isinstance(exc, FlowrayError)
    return {
        "domain": str(doc.get("domain")), "shard_id": str(doc.get("shard_id")), "doc_id": str(doc.get("doc_id")),
        "error_type": type(exc).__name__, "error": str(exc) or type(exc).__name__,
        "traceback": None if expected else traceback.format_exc(limit=8),
        "n_chars": len(text) if isinstance(text, str) else None,
    }


class ShardWorker:
    """The actor class of the Ray pipeline: one shard id in, its outputs written, a summary row out."""

    def __init__(self, *, run_uri: str, crash_once: dict | None = None, **flow_kwargs):
        from flowray.pipeline.storage import Storage

        self.storage = Storage(run_uri)
        self.flow = FlowWorker(**flow_kwargs)
        self.crash_once = crash_once  # fault injection for tests: {"shard_id": ..., "marker": path}
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def _maybe_crash(self, shard_id: str) -> None:
        spec = self.crash_once
        if spec and spec.get("shard_id") == shard_id and not os.path.exists(spec["marker"]):
            with open(spec["marker"], "w") as fh:
                fh.write(self.name)
            log.error("fault injection: worker %s dies while processing %s", self.name, shard_id)
            os._exit(17)  # a hard process death, as an OOM kill or a lost node would be

    def __call__(self, batch: dict) -> dict:
        out = {k: [] for k in ("shard_id", "texts", "predictions", "errors", "seconds", "worker")}
        for shard_id in batch["shard_id"]:
            shard_id = str(shard_id)
            t0 = time.perf_counter()
            docs = self.storage.read_table(f"shards/{shard_id}.parquet").to_pylist()
            half = len(docs) // 2
            predictions, errors = self.flow.process(docs[:half])
            self._maybe_crash(shard_id)  # mid-shard: half the texts done, nothing written yet
            p2, e2 = self.flow.process(docs[half:])
            predictions, errors = pa.concat_tables([predictions, p2]), pa.concat_tables([errors, e2])
            seconds = time.perf_counter() - t0
            summary = {"shard_id": shard_id, "texts": len(docs), "predictions": predictions.num_rows,
                       "errors": errors.num_rows, "seconds": seconds, "worker": self.name,
                       "n_layers": self.flow.shape.n_layers, "n_heads": self.flow.shape.n_heads,
                       "pos_tagging": self.flow.pos_tagging is not None}
            commit_shard(self.storage, shard_id, predictions, errors, summary)  # tables, then the marker
            for k in out:
                out[k].append(summary[k])
        return out
