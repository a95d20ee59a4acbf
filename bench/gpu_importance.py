"""Edge importances on a GPU: a Llama-2-7B-shaped model with random weights in bfloat16.

Measured side by side in one process on one GPU, best of ``--repeats`` after a warm-up:

- ``forward``: a plain forward pass (the model's default attention, sdpa);
- ``flowray``: ``edge_importances`` (capture included; the ``"torch"`` backend, the only one on GPUs),
  whose results come back in host memory as numpy arrays;
- ``host copies``: copying L random ``[H, T, T]`` float32 tensors to the host alone, the part of
  ``flowray`` that is data transfer rather than computation;

then one long context (default 4096 tokens) to check that it fits, with the peak GPU memory of each.
The issue's targets: importances at most 2x the forward pass at 512 tokens, and 4096 tokens on one
80 GB GPU. The device's name is printed with the numbers.

    python bench/gpu_importance.py                    # 512 tokens, then 4096
    python bench/gpu_importance.py --tiny             # the same code on a tiny model on the CPU (smoke test)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # flowray from this checkout, installed or not


def llama2_7b_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    # meta-llama/Llama-2-7b-hf: 32 layers, 32 heads (no GQA), d_model 4096, FFN 11008, vocab 32000
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5)


def build(tiny: bool, device: str, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the weights in bf16 directly: 13.5 GB, not 27 GB of float32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama2_7b_config(tiny))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _peak_gb(fn, device: str) -> float | None:
    if not device.startswith("cuda"):
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--long", type=int, default=4096, help="the long context to check (0: skip)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama on the CPU: checks the script, not speed")
    args = ap.parse_args()
    import flowray

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine, or pass --tiny for the CPU smoke test")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        args.tokens, args.long = min(args.tokens, 64), min(args.long, 128)
    name = "cpu (tiny Llama)" if args.tiny else torch.cuda.get_device_name()
    model = build(args.tiny, device, dtype)
    cfg = model.config
    shape = "a tiny Llama" if args.tiny else "Llama-2-7B shape"
    print(f"# {name}; torch {torch.__version__}; {shape} ({cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads} heads, d={cfg.hidden_size}), random weights, {dtype}")
    gen = torch.Generator().manual_seed(1)

    def ids(T):
        return torch.randint(0, cfg.vocab_size, (1, T), generator=gen)

    x = ids(args.tokens)

    def forward():
        with torch.no_grad():
            model(input_ids=x.to(device), use_cache=False)

    def importances():
        flowray.edge_importances(model, x, backend="torch")

    H, T, L = cfg.num_attention_heads, args.tokens, cfg.num_hidden_layers
    layer_result = torch.rand(H, T, T, device=device)

    def host_copies():  # what the API's copy of each layer's [H, T, T] float32 result to the host costs
        for _ in range(L):
            layer_result.cpu()

    t_fwd = _timed(forward, device, args.repeats)
    t_imp = _timed(importances, device, args.repeats)
    t_copy = _timed(host_copies, device, args.repeats)
    m_fwd, m_imp = _peak_gb(forward, device), _peak_gb(importances, device)
    print(f"{'T':>5} {'forward s':>10} {'flowray s':>10} {'flowray/fwd':>12} {'host copies s':>14} "
          f"{'fwd peak GB':>12} {'flowray peak GB':>16}")
    fmt = (lambda v: f"{v:.1f}" if v is not None else "-")
    print(f"{T:>5} {t_fwd:>10.4f} {t_imp:>10.4f} {t_imp / t_fwd:>12.2f} {t_copy:>14.4f} "
          f"{fmt(m_fwd):>12} {fmt(m_imp):>16}", flush=True)
    if not args.tiny:
        verdict = "met" if t_imp / t_fwd <= 2.0 else "NOT met"
        print(f"# T={T}: flowray/forward = {t_imp / t_fwd:.2f} (target <= 2): {verdict}")
    if args.long:
        x = ids(args.long)
        try:
            t0 = time.perf_counter()
            peak = _peak_gb(importances, device)
            print(f"# T={args.long}: edge importances fit; {time.perf_counter() - t0:.1f} s, peak GPU memory "
                  f"{fmt(peak)} GB")
        except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - GPU only
            print(f"# T={args.long}: out of GPU memory: {exc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
