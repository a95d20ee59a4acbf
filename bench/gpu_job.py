"""The corpus job's per-batch path on a GPU, next to a plain forward pass and to EAP, measured in one run.

Llama-shaped models with random weights in bfloat16 (``--shapes``: Llama-2-7B, Llama-3-8B with GQA and a
128k vocabulary, SmolLM2-135M), batches of random ids, on one GPU:

- ``forward``: a plain forward pass over the batch (the model's default attention, sdpa);
- ``job <backend>``: ``flowray.prediction_stats_batch`` over the same batch (capture, importances on the
  device, routes at 3 taus for every position, the statistics copied to the host): an actor's device work
  per batch, minus tokenising and Parquet;
- ``EAP``: attribution patching's two forward passes and one backward pass over the same batch;

then tokens/s, the ratio to the forward pass, peak GPU memory, the kernels the device ran per batch and the
host synchronisations (torch.profiler), and for the first shape the longest single text that runs (``--long``,
each length under ``--long-limit`` seconds). Imports only torch, transformers and numpy (plus flowray from
this checkout). Goals: job path >= 0.5x forward throughput for the 7B shape at 8 x 512 and >= 0.25x for
SmolLM2 at 32 x 512; one 32k-token 7B text under 40 GB.

    python bench/gpu_job.py                                  # every shape, then 4k..32k tokens
    python bench/gpu_job.py --shapes llama2-7b --long ''     # one shape, no long texts
    python bench/gpu_job.py --long '' --tiles 16x32:64,16x64:32   # prox_tiles and head_outputs_t's tiles too
    python bench/gpu_job.py --tiny                           # the same code on a tiny model on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from gpu_common import (backends_for, build, device_and_dtype, device_name, launches, peak_gb, phase_times, row,
                        sync, timed, top_kernels)

TAUS = (0.01, 0.03, 0.04)
BATCH = {"llama2-7b": (8, 512), "llama3-8b": (8, 512), "smollm2": (32, 512), "tiny": (3, 48)}


def _eap(model, batch):
    from flowray.baselines.eap import eap_sweep
    from flowray.models.families import adapter_for

    adapter = adapter_for(model)
    corrupt = batch.roll(1, dims=1)  # a corrupted twin of every row
    answer, wrong = batch[:, -1], corrupt[:, -1]
    return lambda: eap_sweep(model, adapter, batch, corrupt, answer, wrong)


def bench_shape(shape: str, args, device: str, dtype) -> list[dict]:
    from flowray.stats import prediction_stats_batch

    B, T = BATCH[shape]
    model = build(shape, device, dtype)
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    seqs = [r[None] for r in batch]
    tokens = B * T
    out: dict = {}

    def forward():
        with torch.no_grad():
            model(input_ids=batch.to(device), use_cache=False)

    results = []
    t_fwd = timed(forward, device, args.repeats)
    k_fwd, s_fwd = launches(forward, device)
    results.append(dict(shape=shape, what="forward", seconds=t_fwd, ratio=1.0, peak=peak_gb(forward, device),
                        kernels=k_fwd, syncs=s_fwd))
    for backend in args.backends:
        if backend == "torch" and shape not in args.slow_shapes.split(",") and shape != "tiny":
            continue

        def job(backend=backend):
            out["stats"] = prediction_stats_batch(model, seqs, TAUS, backend=backend)

        reps = args.repeats if backend != "torch" else 1  # the torch backend is the slow reference
        t0 = time.perf_counter()
        t_job = timed(job, device, reps)
        # ~100k kernels per batch on the torch backend: its profile would cost more than it tells
        k_job, s_job = launches(job, device) if backend != "torch" else (None, None)
        results.append(dict(shape=shape, what=f"job {backend}", seconds=t_job, ratio=t_fwd / t_job,
                            peak=peak_gb(job, device), kernels=k_job, syncs=s_job,
                            host_kb_per_prediction=sum(s.host_bytes for s in out["stats"]) / tokens / 1e3,
                            wall_incl_warmup=time.perf_counter() - t0))
    if args.tiles and args.backends and args.backends[0] == "triton":  # other tiles, side by side
        from flowray.kernels import KernelConfig

        for tile, head in args.tiles:
            config = KernelConfig(triton_tile=tile, triton_head_block=head)

            def variant(config=config):
                prediction_stats_batch(model, seqs, TAUS, backend="triton", kernel_config=config)

            t_var = timed(variant, device, args.repeats)
            results.append(dict(shape=shape, what=f"job triton, tiles {tile[0]}x{tile[1]}/{head}", seconds=t_var,
                                ratio=t_fwd / t_var, peak=None))
    if args.backends and args.backends[0] != "torch":  # routes of the last position only: what the rest costs
        def last(backend=args.backends[0]):
            prediction_stats_batch(model, seqs, TAUS, backend=backend, predictions="last")

        t_last = timed(last, device, args.repeats)
        results.append(dict(shape=shape, what=f"job {args.backends[0]}, last", seconds=t_last, ratio=t_fwd / t_last,
                            peak=None))
    if args.profile and args.backends and (shape == args.shapes.split(",")[0] or args.tiny):
        def first():
            prediction_stats_batch(model, seqs, TAUS, backend=args.backends[0])

        for name, ms, calls in top_kernels(first, device):
            print(f"# profile {shape} job {args.backends[0]}: {ms:8.2f} ms {calls:6d} x {name}", flush=True)
        # where the host spends a batch and whether the device waits for it meanwhile
        phases = phase_times(first, device)
        for name, calls, host, busy in phases:
            during = "-" if busy is None else f"{busy:8.2f} ms ({busy / host:4.0%})"
            print(f"# phases {shape} job {args.backends[0]}: {name:<16} {calls:4d} x, host {host:8.2f} ms, "
                  f"device busy meanwhile {during}", flush=True)
        next(r for r in results if r["what"] == f"job {args.backends[0]}")["phases"] = [
            dict(name=n, calls=c, host_ms=h, device_busy_ms=b) for n, c, h, b in phases]
    for r in results:  # as they come: a run stopped at its time limit still shows what it measured
        print(f"# {shape} {r['what']}: {r['seconds']:.4f} s, {r['ratio']:.3f}x forward, kernels {r.get('kernels')}, "
              f"syncs {r.get('syncs')}, peak {r['peak']}", flush=True)
    if args.eap:
        eap = _eap(model, batch)  # eap_sweep moves the ids to the model's device itself
        t_eap = timed(eap, device, args.repeats)
        results.append(dict(shape=shape, what="EAP", seconds=t_eap, ratio=t_fwd / t_eap, peak=peak_gb(eap, device)))
    for r in results:
        r.update(batch=B, tokens=T, tokens_per_s=tokens / r["seconds"], layers=cfg.num_hidden_layers)
    return results, model


def long_texts(model, args, device: str, budget_s: float) -> list[dict]:
    from flowray.stats import prediction_stats_batch

    out, gen = [], torch.Generator().manual_seed(2)
    spent = 0.0
    for T in (96, 128) if args.tiny else [int(t) for t in args.long.split(",") if t]:
        x = torch.randint(0, model.config.vocab_size, (1, T), generator=gen)
        if out and out[-1]["seconds"] * 4.5 > budget_s - spent:  # quadratic: the next one would not fit
            out.append(dict(tokens=T, seconds=None, peak=None, note="skipped: over the time limit"))
            break
        try:
            t0 = time.perf_counter()
            peak = peak_gb(lambda: prediction_stats_batch(model, [x], TAUS), device)
            sync(device)
            seconds = time.perf_counter() - t0
            spent += seconds
            out.append(dict(tokens=T, seconds=seconds, peak=peak))
        except torch.cuda.OutOfMemoryError:  # pragma: no cover - GPU only
            torch.cuda.empty_cache()
            out.append(dict(tokens=T, seconds=None, peak=None, note="out of GPU memory"))
            break
        print(f"# one text of {T} tokens: {out[-1]['seconds']:.1f} s, peak {out[-1]['peak']} GB", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama2-7b,llama3-8b,smollm2")
    ap.add_argument("--backends", default="triton,torch", help="job-path backends to time, in order")
    ap.add_argument("--slow-shapes", default="llama2-7b", help="shapes on which the torch backend is timed too")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long", default="4096,8192,16384,32768", help="single-text lengths (first shape)")
    ap.add_argument("--long-limit", type=float, default=150.0, help="seconds for all long texts together")
    ap.add_argument("--no-eap", dest="eap", action="store_false")
    ap.add_argument("--profile", action="store_true",
                    help="the first shape's costliest device kernels, and its phases: host time and device busy")
    ap.add_argument("--json", default=os.environ.get("OUT") and os.path.join(os.environ["OUT"], "gpu_job.json"))
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama on the CPU: checks the script, not speed")
    ap.add_argument("--tiles", default="", type=str,
                    help="the Triton job path again with other tiles, e.g. 16x32:64,16x64:32 (prox_tiles' "
                         "rows x sources : head_outputs_t's sources; the default is 16x64:64)")
    args = ap.parse_args()
    args.tiles = _tiles(args.tiles, ap)
    device, dtype = device_and_dtype(args.tiny)
    shapes = ["tiny"] if args.tiny else [s for s in args.shapes.split(",") if s]
    args.backends = backends_for(args.backends, args.tiny)
    print(f"# {device_name(device)}; torch {torch.__version__}; random weights, {dtype}; taus {TAUS}", flush=True)
    table, longs = [], []
    for i, shape in enumerate(shapes):
        rows, model = bench_shape(shape, args, device, dtype)
        table += rows
        for r in rows:
            print(f"# {shape} {r['what']}: {r['seconds']:.4f} s, {r['ratio']:.3f}x forward", flush=True)
        if args.json:  # as it goes: a run stopped at its time limit keeps what it measured
            _save(args.json, device, table, longs)
        if i == 0 and args.long:
            longs = long_texts(model, args, device, args.long_limit)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    widths = (10, 12, 8, 9, 10, 10, 8, 9, 7)
    print(row(("shape", "what", "B x T", "seconds", "tokens/s", "vs fwd", "peak GB", "kernels", "syncs"), widths))
    fmt = (lambda v, f: "-" if v is None else format(v, f))
    for r in table:
        cells = (r["shape"], r["what"], f"{r['batch']}x{r['tokens']}", f"{r['seconds']:.4f}", f"{r['tokens_per_s']:.0f}",
                 f"{r['ratio']:.3f}x", fmt(r["peak"], ".1f"), fmt(r.get("kernels"), "d"), fmt(r.get("syncs"), "d"))
        print(row(cells, widths))
    for r in longs:
        print(f"# one {shapes[0]} text of {r['tokens']} tokens: {fmt(r['seconds'], '.1f')} s, peak "
              f"{fmt(r['peak'], '.1f')} GB {r.get('note', '')}")
    if args.json:
        _save(args.json, device, table, longs)
    return 0


def _tiles(text: str, ap) -> list[tuple[tuple[int, int], int]]:
    """``"16x32:64,16x64:32"`` -> ``[((16, 32), 64), ((16, 64), 32)]``; powers of two of at least 16."""
    out = []
    for item in filter(None, text.split(",")):
        try:
            tile, head = item.split(":")
            bp, bj = (int(n) for n in tile.split("x"))
            values = ((bp, bj), int(head))
        except ValueError:
            values = None
        if values is None or any(n < 16 or n & (n - 1) for n in (bp, bj, values[1])):
            ap.error(f"--tiles {item!r}: expected ROWSxSOURCES:HEAD_SOURCES in powers of two of at least 16, "
                     "e.g. 16x32:64")
        out.append(values)
    return out


def _save(path: str, device: str, table: list, longs: list) -> None:
    with open(path, "w") as fh:
        json.dump(dict(device=device_name(device), torch=torch.__version__, table=table, long=longs), fh, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
