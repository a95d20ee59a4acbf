"""The job path at long contexts on this CPU: SmolLM2 up to its 8192-token context, peak extra memory vs T.

Each length runs in a fresh process (so ``ru_maxrss`` is that length's peak): SmolLM2 loaded and warmed up
on a short text, then one text of T tokens (Python's documentation topics, concatenated) through
``flowray.prediction_stats`` (streamed statistics and routes at 3 taus) and, in the same process, a plain
forward pass of the same ids. Peak extra memory = peak RSS during the streamed pass (VmHWM, reset just before it)
minus the RSS before it. The dense ``[L, H, T, T]`` float32 result it never forms is printed beside it.

    python bench/long_context.py                       # T = 512 .. 8192
    python bench/long_context.py --lengths 1024,4096
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TAUS = (0.01, 0.03, 0.04)


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key))  # KiB


def _one(T: int) -> dict:
    import pydoc_data.topics
    import torch

    import flowray
    from flowray.stats import prediction_stats

    lm = flowray.load_model("smollm2", device="cpu")
    text = "\n\n".join(v for _, v in sorted(pydoc_data.topics.topics.items()))
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :T]
    assert ids.shape[1] == T, f"the corpus has only {ids.shape[1]} tokens"
    prediction_stats(lm, ids[:, :64], TAUS)  # warm-up: kernels, allocator
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak RSS (VmHWM) to the current RSS
        fh.write("5")
    rss_kib = _status("VmRSS")
    t0 = time.perf_counter()
    st = prediction_stats(lm, ids, TAUS)
    t_stats = time.perf_counter() - t0
    peak_kib = _status("VmHWM")
    with torch.no_grad():
        t0 = time.perf_counter()
        lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)
        t_fwd = time.perf_counter() - t0
    s = lm.adapter.shape
    return {"T": T, "stats_s": t_stats, "forward_s": t_fwd, "extra_mib": (peak_kib - rss_kib) / 1024,
            "dense_gib": s.n_layers * s.n_heads * T * T * 4 / 2**30, "host_mb": st.host_bytes / 1e6,
            "route_heads": sum(len(r) for r in st.route_heads[0.01]) / T}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="512,1024,2048,4096,8192")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(args.one)))
        return 0
    import torch

    print(f"# SmolLM2-135M, CPU, {torch.get_num_threads()} torch threads; one text per length, fresh process each; "
          f"taus {TAUS}")
    print(f"{'T':>6} {'forward s':>10} {'stats s':>8} {'stats/fwd':>10} {'peak extra MiB':>15} {'MiB per 1k tok':>15} "
          f"{'dense [L,H,T,T] GiB':>20} {'host MB':>8} {'heads/route@0.01':>17}", flush=True)
    for T in (int(t) for t in args.lengths.split(",")):
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", str(T)], capture_output=True,
                              text=True)
        if proc.returncode:
            print(f"{T:>6} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{T:>6} {r['forward_s']:>10.2f} {r['stats_s']:>8.2f} {r['stats_s'] / r['forward_s']:>10.2f} "
              f"{r['extra_mib']:>15.0f} {r['extra_mib'] / T * 1000:>15.1f} {r['dense_gib']:>20.1f} {r['host_mb']:>8.2f} "
              f"{r['route_heads']:>17.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
