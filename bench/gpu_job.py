"""The corpus job's per-text path on a GPU: streamed statistics next to a plain forward pass, one run.

A Llama-2-7B-shaped model with random weights in bfloat16, batches of ``--batch`` texts of ``--tokens``
tokens (random ids), on one GPU:

- ``forward``: a plain forward pass over the batch (the model's default attention, sdpa);
- ``job path``: ``flowray.prediction_stats_batch`` over the same batch (capture, streamed importances on the
  device, routes at 3 taus, the per-prediction statistics copied to the host): what a job actor does per
  batch, minus tokenising and Parquet;

then their tokens/s and ratio, the host bytes per text, the peak GPU memory of each, and the longest
single text that runs (``--long``: tries each length until one runs out of memory). It imports only
torch, transformers and numpy (and flowray from this checkout): what the GPU machines have.
Goals: job path >= 0.5x forward throughput; 32k tokens on one 80 GB GPU.

    python bench/gpu_job.py                   # 8 x 512 tokens, then 4k..32k
    python bench/gpu_job.py --tiny            # the same code on a tiny model on the CPU (smoke test)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # flowray from this checkout, installed or not
from gpu_importance import _peak_gb, _timed, build  # noqa: E402  (the same model and timers as gpu_importance)

TAUS = (0.01, 0.03, 0.04)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long", type=str, default="4096,8192,16384,32768", help="single-text lengths to try")
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama on the CPU: checks the script, not speed")
    args = ap.parse_args()
    from flowray.stats import prediction_stats_batch

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine, or pass --tiny for the CPU smoke test")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    longs = [int(t) for t in args.long.split(",") if t]
    if args.tiny:
        args.tokens, args.batch, longs = min(args.tokens, 48), min(args.batch, 3), [t for t in (96, 128) if t]
    name = "cpu (tiny Llama)" if args.tiny else torch.cuda.get_device_name()
    model = build(args.tiny, device, dtype)
    cfg = model.config
    print(f"# {name}; torch {torch.__version__}; {'a tiny Llama' if args.tiny else 'Llama-2-7B shape'} "
          f"({cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, d={cfg.hidden_size}), random weights, "
          f"{dtype}; batches of {args.batch} x {args.tokens} tokens; taus {TAUS}", flush=True)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.tokens), generator=gen)
    seqs = [row[None] for row in batch]
    out: dict = {}

    def forward():
        with torch.no_grad():
            model(input_ids=batch.to(device), use_cache=False)

    def job():
        out["stats"] = prediction_stats_batch(model, seqs, TAUS)

    t_fwd = _timed(forward, device, args.repeats)
    t_job = _timed(job, device, args.repeats)
    m_fwd, m_job = _peak_gb(forward, device), _peak_gb(job, device)
    tokens = args.batch * args.tokens
    host = sum(s.host_bytes for s in out["stats"]) / len(out["stats"])
    fmt = (lambda v: "-" if v is None else f"{v:.1f}")
    print(f"{'what':<10} {'seconds':>9} {'tokens/s':>10} {'vs forward':>11} {'peak GB':>9}")
    print(f"{'forward':<10} {t_fwd:>9.4f} {tokens / t_fwd:>10.0f} {1.0:>10.2f}x {fmt(m_fwd):>9}")
    print(f"{'job path':<10} {t_job:>9.4f} {tokens / t_job:>10.0f} {t_fwd / t_job:>10.2f}x {fmt(m_job):>9}")
    print(f"# host bytes per text: {host / 1e6:.2f} MB ({host / args.tokens / 1e3:.1f} kB per prediction); the dense "
          f"[L, H, T, T] float32 result would be {cfg.num_hidden_layers * cfg.num_attention_heads * args.tokens**2 * 4 / 1e9:.2f} GB",
          flush=True)
    if not args.tiny:
        verdict = "met" if t_fwd / t_job >= 0.5 else "NOT met"
        print(f"# job path / forward throughput = {t_fwd / t_job:.2f} (goal >= 0.5): {verdict}")
    longest = None
    for T in longs:
        x = torch.randint(0, cfg.vocab_size, (1, T), generator=gen)
        try:
            t0 = time.perf_counter()
            peak = _peak_gb(lambda: prediction_stats_batch(model, [x], TAUS), device)
            print(f"# T={T}: runs; {time.perf_counter() - t0:.1f} s, peak GPU memory {fmt(peak)} GB", flush=True)
            longest = T
        except torch.cuda.OutOfMemoryError:  # pragma: no cover - GPU only
            print(f"# T={T}: out of GPU memory")
            torch.cuda.empty_cache()
            break
    print(f"# longest text that ran: {longest} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
