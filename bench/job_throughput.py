"""Throughput of the corpus job's map stage on a local Ray, next to a plain forward pass, in one run.

The same texts (Python's documentation topics: prose every install has, cut to --max-tokens) go through:
  * a plain forward pass of SmolLM2 in this process (batch 1, torch's default threads), and
  * the job's map stage (edge importances + routes at 3 taus + POS + Parquet rows per prediction) with
    1 actor x 1 CPU, 1 actor x 2 CPUs and 2 actors x 1 CPU.
Map-stage time is wall time after ray.init, so actor start-up (each loads the model) is included.

    python bench/job_throughput.py --texts 24 --max-tokens 128
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--texts-per-shard", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray
    import torch

    import flowray
    from flowray.config import JobConfig
    from flowray.pipeline.job import run_job

    out = Path(tempfile.mkdtemp(prefix="flowray-bench-"))
    base = {"model": "smollm2", "output": str(out), "max_tokens": args.max_tokens, "texts_per_domain": args.texts,
            "texts_per_shard": args.texts_per_shard, "batch_size": 4, "tau": [0.01, 0.03, 0.04],
            "corpora": [{"domain": "prose", "source": {"kind": "pydoc_topics"}}]}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    rows = []
    for actors, cpus in ((1, 1), (1, 2), (2, 1)):
        cfg = JobConfig.from_dict({**base, "run_name": f"a{actors}c{cpus}", "actors": actors, "cpus_per_actor": cpus})
        m = run_job(cfg).manifest
        tokens = m["counts"]["predictions_written"]
        rows.append((f"map stage, {actors} actor(s) x {cpus} CPU", tokens, m["timings"]["map_s"]))
    ray.shutdown()

    # the plain forward pass over exactly the texts (and truncation) the job processed
    import pyarrow.parquet as pq

    lm = flowray.load_model("smollm2", device="cpu")
    shards = sorted((out / "a1c1" / "shards").glob("*.parquet"))
    texts = [t for s in shards for t in pq.read_table(s, columns=["text"]).column("text").to_pylist()]
    ids = [lm.tokenizer(t, return_tensors="pt").input_ids[:, : args.max_tokens] for t in texts]
    with torch.no_grad():
        lm.model(input_ids=ids[0], use_cache=False)  # warm-up
        t0 = time.perf_counter()
        for x in ids:
            lm.model(input_ids=x, use_cache=False)
        fwd_s = time.perf_counter() - t0
    fwd_tokens = sum(x.shape[1] for x in ids)
    assert fwd_tokens == rows[0][1], (fwd_tokens, rows[0][1])

    print(f"# {len(texts)} texts, {fwd_tokens} tokens (<= {args.max_tokens} per text), SmolLM2-135M, CPU, "
          f"{torch.get_num_threads()} torch threads in this process, 2 logical CPUs for Ray")
    fwd_rate = fwd_tokens / fwd_s
    print(f"{'what':<34} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'vs forward':>11}")
    print(f"{'plain forward pass (batch 1)':<34} {fwd_tokens:>7} {fwd_s:>8.2f} {fwd_rate:>9.1f} {1.0:>10.2f}x")
    one = None
    for name, tokens, seconds in rows:
        rate = tokens / seconds
        one = one or rate
        print(f"{name:<34} {tokens:>7} {seconds:>8.2f} {rate:>9.1f} {rate / fwd_rate:>10.2f}x")
    print(f"# 2 actors vs 1 actor x 1 CPU: {rows[2][1] / rows[2][2] / one:.2f}x throughput")
    print(f"# run directories (not cleaned up): {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
