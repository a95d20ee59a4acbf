"""Shared pieces of the GPU benchmarks: model shapes with random weights, timers, peak memory, launch counts.

They import only torch, transformers and numpy (and flowray from this checkout): what the GPU machines
have. ``--tiny`` in each benchmark runs the same code on a tiny model on the CPU (a smoke test).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # flowray from this checkout, installed or not

# name -> (layers, heads, kv heads, d_model, FFN, vocab): the published configs' shapes
SHAPES = {
    "llama2-7b": (32, 32, 32, 4096, 11008, 32000),  # meta-llama/Llama-2-7b-hf
    "llama3-8b": (32, 32, 8, 4096, 14336, 128256),  # meta-llama/Meta-Llama-3-8B: GQA, 128k vocabulary
    "smollm2": (30, 9, 3, 576, 1536, 49152),  # HuggingFaceTB/SmolLM2-135M
    "tiny": (2, 4, 2, 64, 160, 512),
}


def llama_config(shape: str, context: int = 32768):
    from transformers import LlamaConfig

    L, H, H_kv, d, ffn, vocab = SHAPES[shape]
    return LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ffn, num_hidden_layers=L,
                       num_attention_heads=H, num_key_value_heads=H_kv, max_position_embeddings=context,
                       rms_norm_eps=1e-5)


def build(shape: str, device: str, dtype: torch.dtype, context: int = 32768):
    """A Llama of ``shape`` with random weights, built in ``dtype`` on ``device`` directly (no float32 copy)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(shape, context))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def device_and_dtype(tiny: bool) -> tuple[str, torch.dtype]:
    """``cuda`` and bfloat16, or (``--tiny``) the CPU in float32; no GPU without --tiny is a clear exit."""
    if not tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine, or pass --tiny for the CPU smoke test")
    return ("cpu", torch.float32) if tiny else ("cuda", torch.bfloat16)


def backends_for(names: str, tiny: bool) -> list[str]:
    """The backends asked for; on the CPU without Triton's interpreter, the CPU kernel stands in for triton."""
    import os

    out = [b for b in names.split(",") if b]
    if tiny and os.environ.get("TRITON_INTERPRET") != "1":
        out = ["cpu" if b == "triton" else b for b in out]
    return out


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Best of ``repeats`` wall times after one warm-up call (compiles, allocator caches)."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def peak_gb(fn, device: str) -> float | None:
    """Peak GPU memory of one call of ``fn`` (None on the CPU)."""
    if not str(device).startswith("cuda"):
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def launches(fn, device: str) -> tuple[int, int]:
    """(kernels the device ran, host synchronisations) during one call of ``fn`` (torch.profiler)."""
    if not str(device).startswith("cuda"):
        return 0, 0
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    kernels = syncs = 0
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            if not evt.name.startswith(("Memcpy", "Memset", "[memory]")):
                kernels += 1
        elif evt.name in SYNC_CALLS:
            syncs += 1
    return kernels, max(0, syncs - 1)  # the trailing synchronize is the benchmark's own


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu"


def row(cells, widths) -> str:
    return " ".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(zip(cells, widths)))


def top_kernels(fn, device: str, n: int = 14) -> list[tuple[str, float, int]]:
    """The ``n`` device kernels with the most time in one call of ``fn``: (name, ms, calls)."""
    if not str(device).startswith("cuda"):
        return []
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    totals: dict = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            ms, calls = totals.get(evt.name, (0.0, 0))
            totals[evt.name] = (ms + evt.device_time_total / 1e3 if hasattr(evt, "device_time_total")
                                else ms + evt.cuda_time_total / 1e3, calls + 1)
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:n]
    return [(name[:70], ms, calls) for name, (ms, calls) in ranked]


def _merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def phase_times(fn, device: str) -> list[tuple[str, int, float, float | None]]:
    """flowray's phases in one call of ``fn`` (its ``flowray.*`` ranges in torch.profiler, and ``call``: the
    whole call): (name, calls, host ms inside them, ms the device was busy meanwhile; None on the CPU).

    The device runs behind the host, so "busy meanwhile" is the device's work, whoever launched it, that
    overlaps the phase's host time: a phase with little of it is one where the device waits for the host.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = str(device).startswith("cuda")
    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        with record_function("call"):
            fn()
            sync(device)
    busy, ranges = [], []
    for evt in prof.events():
        start, end = evt.time_range.start, evt.time_range.end  # microseconds, one clock for host and device
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            if end > start:
                busy.append((start, end))
        elif evt.name == "call" or evt.name.startswith("flowray."):
            ranges.append((evt.name, start, end))
    busy = _merged(busy)
    totals: dict = {}
    for name, start, end in ranges:
        overlap = sum(max(0.0, min(end, b) - max(start, a)) for a, b in busy)
        calls, host, dev = totals.get(name, (0, 0.0, 0.0))
        totals[name] = (calls + 1, host + (end - start) / 1e3, dev + overlap / 1e3)
    order = dict.fromkeys(name for name, _, _ in sorted(ranges, key=lambda r: r[1]))  # first start first
    return [(n, *totals[n][:2], totals[n][2] if cuda else None) for n in order]
