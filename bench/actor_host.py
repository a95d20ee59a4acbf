"""The actor's host side alone: the real map-stage worker with its device stage replaced by a stand-in.

Shards of real texts (the C4 sample of the project's shared data when found, else Python's documentation
topics, cut to ``--max-tokens``) go through ``ShardWorker.__call__`` as a GPU actor runs them: several calls
at once (``worker.SHARDS_IN_FLIGHT`` shards per GPU actor), each reading its shard, tokenising, aligning words,
tagging, building Arrow rows and committing Parquet files and a marker. The device stage is a stand-in
(``StubStage``): kernel launches and host waits as the job path issues them, ``--device-us`` microseconds
of simulated device time per prediction, then statistics of the chosen shape (precomputed once, see
``synthetic_stats``), so that the host side is measured alone. Printed per setting:

- host microseconds per prediction by step (each thread's CPU time: tokenise, align, POS, rows, the
  device thread's own host work, Parquet encode, sha256 + write + marker);
- predictions/s, and the fraction of the steady state (first to last device batch) the device is busy,
  with the device's idle time per prediction: the host work on the critical path; ``run``: the device's
  share of the whole run's wall time, start and end included.

``serial`` runs the same worker with no overlap (one call at a time, each batch waited for before the
next is submitted: what the worker did before it overlapped), side by side in the same run; ``--calls 2,4``
adds a row per number of shards in flight (``overlap:2``, ``overlap:4``).

    python bench/actor_host.py                        # 7B shape, 0 and 55 us per prediction, one core
    python bench/actor_host.py --device-us 119        # the job path's device time on an H200 (0.487 s per 8 x 512)
    python bench/actor_host.py --shape smollm2 --texts 32
    python bench/actor_host.py --device cuda          # the real model (random weights, bf16) on a GPU
    python bench/actor_host.py --tiny                 # seconds, on a tiny shape (the test suite runs it)
    python bench/actor_host.py --layouts              # the Parquet encode alone, the job's layout vs others

With ``--device cpu|cuda`` the stage is the real model of the shape (random weights; torch,
transformers, numpy, pyarrow and this checkout, plus nltk for POS tags), and the device's busy fraction is
the same batches' time through the stage alone over the pipeline's time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa

# flowray from this checkout, installed or not; the Parquet layouts' timing beside this script
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

TAUS = (0.01, 0.03, 0.04)
SHAPES = {  # LlamaConfig fields; the stand-in reads only the layers and heads
    "smollm2": dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                    intermediate_size=1536, head_dim=64),
    "7b": dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_size=4096,
               intermediate_size=11008, head_dim=128),
    "8b": dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096,
               intermediate_size=14336, head_dim=128),
    "tiny": dict(num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, hidden_size=24,
                 intermediate_size=32, head_dim=8),
}
# Route sizes as fractions of the heads (of the layers for FFNs) at each tau, as measured on SmolLM2's
# default job run (mean list lengths / L*H or L)
ROUTE_FRACTIONS = {"route_heads": (0.51, 0.12, 0.056), "route_ffn": (0.99, 0.84, 0.73),
                   "pruned_heads": (0.16, 0.04, 0.025)}
_RELEASE = bytes(4096)  # hashlib releases the GIL while it hashes 2 kB or more
STEPS = ("tokenise", "align", "pos", "rows", "device_cpu", "encode", "commit_rest")


def synthetic_stats(T: int, words, L: int, H: int, seed: int) -> dict:
    """One text's statistics with SmolLM2's measured value mix: components 4% zeros, else log-normal
    (median 0.0054, 90% below 0.044); shares 31% zeros, else Beta(0.3, 0.8), NaN where undefined;
    route keys nested across taus (a larger tau keeps a subset) with ``ROUTE_FRACTIONS``' sizes."""
    rng = np.random.default_rng(seed)
    LH = L * H
    comps = np.exp(rng.normal(np.log(0.0054), 1.64, size=(T, LH + L))).clip(0, 1).astype(np.float32)
    comps[rng.random((T, LH + L)) < 0.04] = 0

    def share():
        s = rng.beta(0.3, 0.8, size=(T, LH)).astype(np.float32)
        s[rng.random((T, LH)) < 0.31] = 0
        return s

    prev, same = share(), share()
    prev[0] = np.nan
    word_index, first = words
    same[first | (np.asarray(word_index) < 0)] = np.nan  # defined on later subwords only
    keys = {}
    for kind, fractions in ROUTE_FRACTIONS.items():
        width = L if kind == "route_ffn" else LH
        u = rng.random((T, width))
        keys[kind] = {tau: (np.flatnonzero(u < f), width) for tau, f in zip(TAUS, fractions)}
    return {"components": comps, "prev": prev, "same": same, "keys": keys,
            "predicted": rng.integers(0, 32000, size=T)}


class StubStage:
    """The device stage's interface (``flowray.pipeline.device.ModelStage``) with no model.

    A batch is ``launches`` kernel launches from this thread, as a forward pass issues them: each holds the
    GIL for ``launch_us`` (the op's Python side) and then releases it once (torch releases it inside every
    op), and queues ``device_us`` x predictions / launches of simulated device time behind the previous
    kernel. ``syncs`` times per batch, evenly spaced (the last at its end), the thread waits for the device
    to drain, as a host read of a device value does. It returns statistics of the shape, precomputed per
    text. The device is busy while its queue holds work; it idles when the launches fall behind, e.g. while
    this thread waits for the GIL after a synchronisation.
    """

    def __init__(self, tokenizer, shape: str, lead: int, launches: int, launch_us: float, syncs: int):
        cfg = SHAPES[shape]
        self.tokenizer, self.lead = tokenizer, lead
        self.shape = SimpleNamespace(n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                                     max_positions=None)
        self.startup: dict = {}
        self.device_us, self.launches, self.launch_us = 0.0, launches, launch_us
        self.sync_every = max(1, launches // max(1, syncs))
        self.busy: list[tuple[float, float]] = []  # (start, end) of the device's busy stretches
        self._pre: dict = {}

    def _device(self, predictions: int) -> None:
        kernel = self.device_us * 1e-6 * predictions / self.launches
        free = start = time.perf_counter()  # the device's queue runs dry at ``free``
        for i in range(self.launches):
            until = time.perf_counter() + self.launch_us * 1e-6
            while time.perf_counter() < until:  # the op's Python side, holding the GIL
                pass
            hashlib.sha256(_RELEASE)  # the op's C++ side: ~2 us with the GIL released, as torch's dispatch
            now = time.perf_counter()
            if now > free:  # the queue ran dry: the device idled until this launch
                self.busy.append((start, free))
                start = now
            free = max(free, now) + kernel
            if (i + 1) % self.sync_every == 0 or i + 1 == self.launches:  # the host waits for the device
                time.sleep(max(0.0, free - time.perf_counter()))
        self.busy.append((start, free))

    def __call__(self, sequences, words, sources) -> list:
        import torch

        from flowray.sparse_routes import KeyRows
        from flowray.stats import PredictionStats

        L, H = self.shape.n_layers, self.shape.n_heads
        self._device(sum(len(ids) - self.lead for ids in sequences))
        out = []
        for ids, w in zip(sequences, words):
            key = tuple(ids)
            if key not in self._pre:  # generated on the warm-up pass, never timed
                self._pre[key] = synthetic_stats(len(ids), w, L, H, seed=len(self._pre))
            pre = self._pre[key]
            rows = {kind: {tau: KeyRows(torch.from_numpy(k), width, len(ids)) for tau, (k, width) in per.items()}
                    for kind, per in pre["keys"].items()}
            out.append(PredictionStats(
                taus=TAUS, n_layers=L, n_heads=H, parallel=False, token_ids=np.asarray(ids),
                predicted_ids=pre["predicted"], components=pre["components"], route_heads=rows["route_heads"],
                route_ffn=rows["route_ffn"], prev_share=pre["prev"], same_word_share=pre["same"],
                pruned_heads=rows["pruned_heads"]))
        return out


def load_texts(n: int, tiny: bool) -> tuple[list[str], str]:
    from flowray.config import find_shared_data

    shared = find_shared_data()
    c4 = shared / "c4_sample" / "c4_en_sample_1000.jsonl" if shared else None
    if c4 is not None and c4.is_file() and not tiny:
        with open(c4, encoding="utf-8") as f:
            return [json.loads(line)["text"] for _, line in zip(range(n), f)], "C4 sample"
    import pydoc_data.topics

    topics = [t for _, t in sorted(pydoc_data.topics.topics.items()) if len(t) > 2000]
    return [topics[i % len(topics)] for i in range(n)], "Python documentation topics"


def make_tokenizer(kind: str, texts: list[str], vocab: int):
    """SmolLM2's tokenizer (the packaged GGUF), or a byte-level BPE trained here on ``texts``."""
    if kind == "smollm2":
        from flowray.models.loading import load_tokenizer

        return load_tokenizer("smollm2"), "SmolLM2's tokenizer"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>"), f"a byte-level BPE ({vocab}) trained on them"


def real_model(shape: str, tokenizer, device: str):
    """A Llama of the shape with random weights (bf16 on CUDA), as a ``LoadedModel``."""
    import torch
    import transformers as tf

    from flowray.models.loading import LoadedModel
    from flowray.models.families import adapter_for

    cfg = tf.LlamaConfig(**SHAPES[shape], vocab_size=len(tokenizer), max_position_embeddings=4096)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = tf.LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter_for(model), name=f"random {shape}")


class _Timed:
    """Adds each call's CPU seconds (the calling thread's) to ``self.seconds``; thread-safe."""

    def __init__(self, fn):
        self.fn, self.seconds, self.lock = fn, 0.0, threading.Lock()

    def __call__(self, *args, **kwargs):
        t = time.thread_time()
        try:
            return self.fn(*args, **kwargs)
        finally:
            with self.lock:
                self.seconds += time.thread_time() - t


def run_once(worker, storage, shard_ids: list[str], calls: int, stage) -> dict:
    """Every shard through ``worker`` on ``calls`` threads (a GPU actor's calls in flight)."""
    import flowray.pipeline.commit as commit
    import flowray.pipeline.worker as worker_module

    encode, total = _Timed(commit._parquet_bytes), _Timed(commit.commit_shard)
    commit._parquet_bytes, worker_module.commit_shard = encode, total
    todo: queue.Queue = queue.Queue()
    for sid in shard_ids:
        todo.put(sid)
    predictions, failures = [], []

    def call():
        while True:
            try:
                sid = todo.get_nowait()
            except queue.Empty:
                return
            try:
                predictions.append(worker({"shard_id": [sid]})["predictions"][0])
            except Exception as exc:  # noqa: BLE001 - reported by the main thread
                failures.append(exc)

    busy_from = len(getattr(stage, "busy", []))
    t0 = time.perf_counter()
    threads = [threading.Thread(target=call) for _ in range(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    commit._parquet_bytes, worker_module.commit_shard = encode.fn, total.fn
    if failures:
        raise failures[0]
    steps = dict.fromkeys(STEPS, 0.0)
    size = 0
    for sid in shard_ids:
        marker = json.loads(storage.read_bytes(f"done/{sid}.json"))
        size += marker["files"]["predictions"]["bytes"]
        for k, v in marker["steps_s"].items():
            if k in steps:
                steps[k] += v
    steps["encode"] = encode.seconds
    steps["commit_rest"] = total.seconds - encode.seconds
    n = sum(predictions)
    out = {"predictions": n, "wall": wall, "bytes": size / n, "us": {k: 1e6 * v / n for k, v in steps.items()}}
    busy = getattr(stage, "busy", [])[busy_from:]
    if busy:
        window = busy[-1][1] - busy[0][0]
        device = sum(e - s for s, e in busy)
        out.update(busy=device / window if window > 0 else 1.0, idle_us=1e6 * max(window - device, 0.0) / n,
                   run=device / wall)
    return out


def device_alone(worker, docs_by_shard: list[list[dict]]) -> float:
    """Seconds the shards' batches take through the device stage alone, back to back (the real model)."""
    batches = []
    for docs in docs_by_shard:
        ready = sorted((worker._prepare(i, d) for i, d in enumerate(docs)), key=lambda p: len(p.ids))
        size = worker.config.batch_size
        batches += [ready[s : s + size] for s in range(0, len(ready), size)]
    t0 = time.perf_counter()
    for group in batches:
        worker._stats(group)
    return time.perf_counter() - t0


def _counts(text: str) -> list[int]:
    if not all(c.isdigit() and int(c) > 0 for c in text.split(",")):
        raise argparse.ArgumentTypeError(f"expected positive whole numbers separated by commas, e.g. 2,4; got {text!r}")
    return [int(c) for c in text.split(",")]


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--device", choices=("stub", "cpu", "cuda"), default="stub",
                    help="stub: the simulated device; cpu/cuda: the real model of the shape (random weights)")
    ap.add_argument("--device-us", default="0,55", help="simulated device microseconds per prediction (stub)")
    # the defaults: the job path on an H200 at the 7B shape, 8 x 512 tokens, ran 4,809 kernels and 71 host
    # synchronisations per batch (docs/performance.md)
    ap.add_argument("--launches-per-layer", type=int, default=150, help="kernel launches per layer and batch (stub)")
    ap.add_argument("--launch-us", type=float, default=5.0, help="host microseconds per launch, GIL held (stub)")
    ap.add_argument("--syncs", type=int, default=71, help="host waits for the device per batch (stub)")
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--texts-per-shard", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--calls", type=_counts, default=[], help="shards in flight per actor, e.g. 2,4 (default: a GPU actor's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cores", type=int, default=1, help="CPU cores this process may use (0: all)")
    ap.add_argument("--tokenizer", choices=("auto", "smollm2", "bpe"), default="auto")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape and a few short texts: checks the script")
    ap.add_argument("--layouts", action="store_true",
                    help="time the Parquet encode of the shards' prediction tables in other layouts, then stop")
    args = ap.parse_args()
    if args.tiny:
        args.shape, args.texts, args.max_tokens, args.texts_per_shard = "tiny", 6, 24, 3
        args.batch_size, args.repeats, args.tokenizer = 2, 1, "bpe"
    if args.tokenizer == "auto":
        import importlib.util

        args.tokenizer = "smollm2" if args.device == "stub" and importlib.util.find_spec("gguf") else "bpe"
    return args


def main() -> int:
    args = _args()
    if args.cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    import torch

    import flowray.pipeline.worker as worker_module
    from flowray.config import CorpusConfig, JobConfig
    from flowray.pipeline.device import ModelStage
    from flowray.pipeline.storage import Storage
    from flowray.pipeline.worker import FlowWorker, ShardWorker
    from flowray.tables import SHARD_INPUT

    if args.cores:
        torch.set_num_threads(args.cores)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine, or use --device stub")
    texts, source = load_texts(args.texts, args.tiny)
    tokenizer, tok_name = make_tokenizer(args.tokenizer, texts, 2000 if args.tiny else 32000)
    config = JobConfig(corpora=(CorpusConfig(domain="c4", source={"kind": "pydoc_topics"}),), model="smollm2",
                       tau=TAUS, max_tokens=args.max_tokens, batch_size=args.batch_size,
                       gpus_per_actor=1 if args.device == "cuda" else 0, cpus_per_actor=max(args.cores, 1))
    if args.device == "stub":
        stage = StubStage(tokenizer, args.shape, lead=1,
                          launches=args.launches_per_layer * SHAPES[args.shape]["num_hidden_layers"],
                          launch_us=args.launch_us, syncs=args.syncs)
    else:
        stage = ModelStage(config, lm=real_model(args.shape, tokenizer, args.device))

    class BenchShardWorker(ShardWorker):
        def make_flow(self, cfg):
            return FlowWorker(cfg, stage=stage)

    run = Path(tempfile.mkdtemp(prefix="flowray-actor-bench-"))
    storage = Storage(str(run))
    shard_ids, docs_by_shard = [], []
    for s in range(0, len(texts), args.texts_per_shard):
        sid = f"c4-{s // args.texts_per_shard:05d}"
        docs = [{"shard_id": sid, "doc_id": f"c4-{i:06d}", "domain": "c4", "language": "en", "is_task": False,
                 "text": texts[i], "meta": "{}"} for i in range(s, min(s + args.texts_per_shard, len(texts)))]
        storage.write_table(f"shards/{sid}.parquet", pa.Table.from_pylist(docs, schema=SHARD_INPUT))
        shard_ids.append(sid)
        docs_by_shard.append(docs)
    worker = BenchShardWorker(run_uri=str(run), config=config)
    device_us = [float(u) for u in args.device_us.split(",")] if args.device == "stub" else [None]
    calls = args.calls or [worker_module.SHARDS_IN_FLIGHT]
    ahead = worker_module.AHEAD  # the job's; serial mode sets 0 for its runs
    modes = {("overlap" if len(calls) == 1 else f"overlap:{c}"): (c, ahead) for c in calls}
    modes["serial"] = (1, 0)
    run_once(worker, storage, shard_ids, max(calls), stage)  # warm-up: caches, statistics, first-call costs
    if args.layouts:
        import pyarrow.parquet as pq
        from parquet_layouts import time_layouts

        time_layouts([pq.read_table(run / "predictions" / f"{sid}.parquet") for sid in shard_ids],
                     max(args.repeats, 5))
        shutil.rmtree(run, ignore_errors=True)
        return 0
    results: dict = {}
    for _ in range(args.repeats):  # interleaved: the machine's drift hits every setting alike
        for mode, (n_calls, mode_ahead) in modes.items():
            for us in device_us:
                if us is not None:
                    stage.device_us = us
                worker_module.AHEAD = mode_ahead
                try:
                    r = run_once(worker, storage, shard_ids, n_calls, stage)
                finally:
                    worker_module.AHEAD = ahead
                if us is None:
                    r["busy"] = r["run"] = device_alone(worker.flow, docs_by_shard) / r["wall"]
                results.setdefault((mode, us), []).append(r)
    shutil.rmtree(run, ignore_errors=True)
    _print(args, results, source, tok_name, texts)
    return 0


def _print(args, results: dict, source: str, tok_name: str, texts: list) -> None:
    import torch

    cfg = SHAPES[args.shape]
    where = "the simulated device" if args.device == "stub" else (
        torch.cuda.get_device_name() if args.device == "cuda" else "the CPU")
    cores = f"{args.cores} core(s)" if args.cores else f"{os.cpu_count()} cores"
    print(f"# actor host: {args.shape} shape ({cfg['num_hidden_layers']} layers x {cfg['num_attention_heads']} heads) "
          f"on {where}; {len(texts)} texts ({source}) cut to {args.max_tokens} tokens, {tok_name}; "
          f"shards of {args.texts_per_shard}, batches of {args.batch_size}; {cores}; taus {TAUS}; "
          f"medians of {args.repeats} interleaved repeats")
    med = (lambda rs, f: statistics.median(f(r) for r in rs))
    head = " ".join(f"{s:>11}" for s in STEPS)
    print(f"{'mode':<9} {'dev_us':>6} {'pred/s':>8} {'busy':>6} {'run':>6} {'idle_us':>7} {'B/pred':>7} {head} "
          f"{'host_us':>8}")
    for (mode, us), rs in results.items():
        steps = " ".join(f"{med(rs, lambda r, k=k: r['us'][k]):>11.2f}" for k in STEPS)
        total = med(rs, lambda r: sum(r["us"].values()))
        idle = f"{med(rs, lambda r: r['idle_us']):>7.1f}" if "idle_us" in rs[0] else f"{'-':>7}"
        rate, busy, run = (med(rs, f) for f in (lambda r: r["predictions"] / r["wall"], lambda r: r["busy"],
                                                 lambda r: r["run"]))
        print(f"{mode:<9} {'-' if us is None else f'{us:g}':>6} {rate:>8.0f} {busy:>6.1%} {run:>6.1%} {idle} "
              f"{med(rs, lambda r: r['bytes']):>7.0f} {steps} {total:>8.2f}")
    print("# host_us: CPU microseconds per prediction by step, summed over threads; idle_us: the device's idle "
          "time per prediction between its first and last batch (the host work on the critical path); busy: "
          + ("the device's share of that time; run: its share of the whole run's wall time"
             if args.device == "stub" else
             "the batches' time through the stage alone over the pipeline's wall time (run: the same)"))


if __name__ == "__main__":
    raise SystemExit(main())
