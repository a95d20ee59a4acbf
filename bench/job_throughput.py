"""Throughput of the corpus job's map stage next to a plain forward pass over the same batches, in one run.

Start-up (Ray starting a worker, imports, model load, tagger, compiled kernels) is reported apart from the
steady state. The same texts (Python's documentation topics: prose every install has, cut to
--max-tokens) go through:
  * in this process, alternately (--repeats times, medians reported):
    - a plain forward pass of SmolLM2 over exactly the batches the worker forms (bucketed by length,
      --batch-size texts, right padding, attention mask), and
    - the worker itself (``FlowWorker.process``: streamed statistics + routes at 3 taus + POS + Parquet
      rows), after a warm-up call;
  * the job's map stage on a local Ray with 1 actor x 1 CPU, 1 actor x 2 CPUs and 2 actors x 1 CPU:
    steady state = tokens / the busiest actor's summed shard seconds; start-up from the actors' own clocks.

    python bench/job_throughput.py --texts 24 --max-tokens 128
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path


def _batches(worker, docs, batch_size):
    """The padded batches ``FlowWorker.process`` forms for ``docs`` (same bucketing)."""
    import torch

    ready = sorted((worker._prepare(i, d) for i, d in enumerate(docs)), key=lambda p: len(p.ids))
    out = []
    for start in range(0, len(ready), batch_size):
        group = ready[start : start + batch_size]
        T = max(len(p.ids) for p in group)
        ids = torch.zeros(len(group), T, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(group):
            ids[b, : len(p.ids)], mask[b, : len(p.ids)] = torch.tensor(p.ids), 1
        out.append((ids, mask))
    return out


def _in_process(config, docs, repeats: int) -> dict:
    import torch

    from flowray.pipeline.worker import FlowWorker

    t0 = time.perf_counter()
    worker = FlowWorker(config)
    startup = time.perf_counter() - t0
    batches = _batches(worker, docs, config.batch_size)
    tokens = sum(int(m.sum()) for _, m in batches)  # what both passes process: BOS included
    rows = tokens - (len(docs) if worker.bos is not None else 0)  # the BOS row is not written
    model = worker.lm.model

    def forward():
        with torch.no_grad():
            for ids, mask in batches:
                model(input_ids=ids, attention_mask=mask, use_cache=False)

    def job():
        preds, errors = worker.process(docs)
        assert preds.num_rows == rows and errors.num_rows == 0, (preds.num_rows, rows, errors.num_rows)

    forward()
    worker.process(docs[:2])  # warm-up: first-call allocations, cached kernels
    fwd, stats = [], []
    for _ in range(repeats):  # interleaved: drift on a noisy machine hits both alike
        for times, fn in ((fwd, forward), (stats, job)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return {"tokens": tokens, "threads": torch.get_num_threads(), "startup_s": startup, "startup": worker.startup,
            "forward_s": statistics.median(fwd), "job_s": statistics.median(stats), "forward_all": fwd,
            "job_all": stats}


def _ray_runs(base: dict, out: Path) -> list[dict]:
    import ray

    from flowray.config import JobConfig
    from flowray.pipeline.job import run_job

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    rows = []
    for actors, cpus in ((1, 1), (1, 2), (2, 1)):
        cfg = JobConfig.from_dict({**base, "run_name": f"a{actors}c{cpus}", "actors": actors, "cpus_per_actor": cpus})
        manifest = run_job(cfg).manifest
        markers = [json.loads(p.read_text()) for p in (out / cfg.run_name / "done").glob("*.json")]
        busy: dict[str, float] = {}
        startup: dict[str, dict] = {}
        for m in markers:
            busy[m["worker"]] = busy.get(m["worker"], 0.0) + m["seconds"]
            startup[m["worker"]] = m.get("startup") or {}
        c = manifest["counts"]  # tokens processed: the rows written plus each text's BOS (no row of its own)
        tokens = c["predictions_written"] + (c["texts_with_predictions"] if manifest.get("bos") else 0)
        rows.append({"name": f"{actors} actor(s) x {cpus} CPU", "tokens": tokens,
                     "map_s": manifest["timings"]["map_s"], "busy_s": max(busy.values()),
                     "startup": max(startup.values(), key=lambda s: s.get("init_s", 0.0))})
    ray.shutdown()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--texts-per-shard", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-ray", action="store_true", help="only the in-process comparison")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import pyarrow.parquet as pq
    import torch

    from flowray.config import JobConfig

    out = Path(tempfile.mkdtemp(prefix="flowray-bench-"))
    base = {"model": "smollm2", "output": str(out), "max_tokens": args.max_tokens, "texts_per_domain": args.texts,
            "texts_per_shard": args.texts_per_shard, "batch_size": args.batch_size, "tau": [0.01, 0.03, 0.04],
            "corpora": [{"domain": "prose", "source": {"kind": "pydoc_topics"}}]}
    # the texts' shards, prepared as the job prepares them; the in-process comparison runs first, before Ray
    # and the driver's kernel warm-up (which sizes numba's pool to one thread) have touched this process
    from flowray.models.loading import load_tokenizer
    from flowray.pipeline.prepare import prepare
    from flowray.pipeline.storage import Storage

    prepare(JobConfig.from_dict({**base, "run_name": "texts"}), Storage(str(out / "texts")), load_tokenizer("smollm2"))
    shards = sorted((out / "texts" / "shards").glob("*.parquet"))
    docs = [d for s in shards for d in pq.read_table(s).to_pylist()]
    config = JobConfig.from_dict({**base, "run_name": "inproc", "cpus_per_actor": torch.get_num_threads()})
    inproc = _in_process(config, docs, args.repeats)
    rows = [] if args.no_ray else _ray_runs(base, out)

    tokens = inproc["tokens"]
    fwd_rate = tokens / inproc["forward_s"]
    print(f"# {len(docs)} texts, {tokens} tokens (<= {args.max_tokens} per text, a BOS each), SmolLM2-135M, CPU, "
          f"batches of {args.batch_size} bucketed by length; in-process: {inproc['threads']} torch threads, "
          f"medians of {args.repeats} interleaved repeats; Ray: 2 logical CPUs")
    print(f"{'what':<44} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'vs forward':>11}")
    print(f"{'plain forward pass, same batches':<44} {tokens:>7} {inproc['forward_s']:>8.2f} {fwd_rate:>9.1f} {1.0:>10.2f}x")
    job_rate = tokens / inproc["job_s"]
    print(f"{'worker, steady state (in process)':<44} {tokens:>7} {inproc['job_s']:>8.2f} {job_rate:>9.1f} "
          f"{job_rate / fwd_rate:>10.2f}x")
    for r in rows:
        steady = r["tokens"] / r["busy_s"]
        wall = r["tokens"] / r["map_s"]
        print(f"{'map stage, ' + r['name'] + ', steady state':<44} {r['tokens']:>7} {r['busy_s']:>8.2f} {steady:>9.1f} "
              f"{steady / fwd_rate:>10.2f}x")
        print(f"{'map stage, ' + r['name'] + ', start-up included':<44} {r['tokens']:>7} {r['map_s']:>8.2f} {wall:>9.1f} "
              f"{wall / fwd_rate:>10.2f}x")
    print()
    print("# start-up, seconds (in process; and the slowest actor of each Ray run, from its own clock)")
    steps = list(inproc["startup"])
    print(f"{'where':<30} " + " ".join(f"{s.removesuffix('_s'):>19}" for s in ["ray_worker_start_s", *steps, "init_s"]))
    print(f"{'in process':<30} " + " ".join(f"{v:>19}" for v in
                                            ["-", *(f"{inproc['startup'][s]:.2f}" for s in steps), f"{inproc['startup_s']:.2f}"]))
    for r in rows:
        st = r["startup"]
        cells = [st.get("ray_worker_start_s"), *(st.get(s) for s in steps), st.get("init_s")]
        print(f"{r['name']:<30} " + " ".join(f"{'-' if v is None else f'{v:.2f}':>19}" for v in cells))
    print(f"# run directories (not cleaned up): {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
