"""Every edge importance of one text on a GPU (the dense API), next to a plain forward pass, in one run.

A Llama-2-7B-shaped model with random weights in bfloat16, on one GPU, best of ``--repeats`` after a warm-up:

- ``forward``: a plain forward pass (the model's default attention, sdpa);
- ``flowray <backend>``: ``flowray.edge_importances``, capture included, results in host memory as numpy
  arrays (``L`` layers of ``[H, T, T]`` float32: 1 GB at 512 tokens, copied through pinned buffers while
  the next layer computes);
- ``host copy``: copying ``L`` device tensors of ``[H, T, T]`` float32 into pinned host memory alone;

then one long context (default 4096 tokens) to check that it fits, with peak GPU memory. Goal: the Triton
backend within 3x a forward pass at 512 tokens, host copy included. Imports only torch, transformers and
numpy (plus flowray from this checkout).

    python bench/gpu_importance.py                    # 512 tokens, then 4096
    python bench/gpu_importance.py --tiny             # the same code on a tiny model on the CPU (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from gpu_common import backends_for, build, device_and_dtype, device_name, peak_gb, row, timed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--long", type=int, default=4096, help="the long context to check (0: skip)")
    ap.add_argument("--backends", default="triton,torch")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=os.environ.get("OUT") and os.path.join(os.environ["OUT"], "gpu_importance.json"))
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama on the CPU: checks the script, not speed")
    args = ap.parse_args()
    import flowray

    device, dtype = device_and_dtype(args.tiny)
    backends = backends_for(args.backends, args.tiny)
    if args.tiny:
        args.tokens, args.long = min(args.tokens, 64), min(args.long, 128)
    shape = "tiny" if args.tiny else "llama2-7b"
    model = build(shape, device, dtype)
    cfg = model.config
    print(f"# {device_name(device)}; torch {torch.__version__}; {shape} ({cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads} heads, d={cfg.hidden_size}), random weights, {dtype}", flush=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (1, args.tokens), generator=gen)
    H, T, L = cfg.num_attention_heads, args.tokens, cfg.num_hidden_layers

    def forward():
        with torch.no_grad():
            model(input_ids=x.to(device), use_cache=False)

    layer = torch.rand(H, T, T, device=device)
    host = torch.empty(L, H, T, T, pin_memory=device == "cuda")

    def host_copy():
        for l in range(L):
            host[l].copy_(layer, non_blocking=True)

    rows = [dict(what="forward", seconds=timed(forward, device, args.repeats), peak=peak_gb(forward, device))]
    for backend in backends:
        def imp(backend=backend):
            flowray.edge_importances(model, x, backend=backend)

        reps = args.repeats if backend != "torch" else 1
        rows.append(dict(what=f"flowray {backend}", seconds=timed(imp, device, reps), peak=peak_gb(imp, device)))
    rows.append(dict(what="host copy", seconds=timed(host_copy, device, args.repeats), peak=None))
    widths = (16, 10, 10, 9)
    print(row(("what", "seconds", "vs forward", "peak GB"), widths))
    for r in rows:
        r["ratio"] = r["seconds"] / rows[0]["seconds"]
        print(row((r["what"], f"{r['seconds']:.4f}", f"{r['ratio']:.2f}x",
                   "-" if r["peak"] is None else f"{r['peak']:.1f}"), widths), flush=True)
    long = None
    if args.long:
        x = torch.randint(0, cfg.vocab_size, (1, args.long), generator=gen)
        try:
            t0 = time.perf_counter()
            peak = peak_gb(lambda: flowray.edge_importances(model, x, backend=backends[0]), device)
            long = dict(tokens=args.long, seconds=time.perf_counter() - t0, peak=peak)
            print(f"# T={args.long} ({backends[0]}): fits; {long['seconds']:.1f} s, peak GPU memory {peak} GB")
        except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - GPU only
            long = dict(tokens=args.long, error=str(exc)[:200])
            print(f"# T={args.long}: out of GPU memory")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=device_name(device), tokens=args.tokens, rows=rows, long=long), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
