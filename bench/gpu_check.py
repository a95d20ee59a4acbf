"""The GPU kernels against the CPU ones, on a GPU: every family, both paddings, and the bfloat16 fast path.

1. Tiny random models of the test suite (``tests/tiny_models.py``; a representative eight by default, all 23
   with ``--all-families``: each family's shapes compile the programs anew), float32, on the GPU:
   ``prediction_stats_batch`` (Triton) of three ragged texts, right and left padded, against the dense CPU
   path of the same model on the CPU: components, shares and sources (largest difference) and every route
   and pruned-head list (identical or not).
2. A wider bfloat16 Llama (``dh = 128``: the tensor-core path) on the GPU: Triton against the torch backend
   on the same activations, for the statistics and for the dense API, with the kernel's rare paths forced
   (few coordinates per tile, small lists that overflow, source windows, one hit slot per node).

Prints one line per check and ``ALL OK`` or the failures; exit status 1 on a failure. Imports only torch,
transformers and numpy (plus flowray and tests/tiny_models.py from this checkout).

    python bench/gpu_check.py
    python bench/gpu_check.py --tiny      # CPU, with TRITON_INTERPRET=1: the same checks, two families
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from gpu_common import device_name

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
TAUS = (0.02, 0.05, 0.11)
# GQA, biases, parallel blocks, post-attention norms with soft-capping and windows, no pre-norms, MoE
REPRESENTATIVE = ["llama-gqa", "gpt2", "opt", "neox-parallel", "mistral", "gemma2", "olmo2", "mixtral"]
LENGTHS = (13, 5, 22)


def _words(T: int, seed: int):
    rng = np.random.default_rng(seed)
    word_index = np.cumsum(rng.random(T) < 0.6) - 1
    first = np.r_[True, word_index[1:] != word_index[:-1]]
    return word_index, first


def _compare(a_list, b_list) -> tuple[float, int, int]:
    """(largest difference of the float statistics, route/pruned lists compared, lists that differ).

    Importances compare absolutely; the shares (ratios of two sums, which a head with little total
    influence amplifies) relatively, as the test suite does: ``|x - y| - 1e-5 |y|``."""
    worst, lists, differ = 0.0, 0, 0
    for a, b in zip(a_list, b_list):
        for name in ("components", "prev_share", "same_word_share", "source_edges"):
            x, y = getattr(a, name), getattr(b, name)
            if x is None and y is None:
                continue
            both = np.isfinite(x) & np.isfinite(y)
            if (np.isnan(x) != np.isnan(y)).any():
                worst = float("inf")
            gap = np.abs(x[both] - y[both])
            if name.endswith("share"):
                gap = gap - 1e-5 * np.abs(y[both])
            worst = max(worst, float(gap.max(initial=0.0)))
        for kind in ("route_heads", "route_ffn", "pruned_heads"):
            for tau in TAUS:
                for p, q in zip(getattr(a, kind)[tau], getattr(b, kind)[tau]):
                    lists += 1
                    differ += int(p.tolist() != q.tolist())
        differ += int((a.predicted_ids != b.predicted_ids).any())
    return worst, lists, differ


def families(device: str, names: list[str]) -> list[str]:
    from tiny_models import VOCAB, tiny_model

    from flowray.stats import prediction_stats_batch

    failures = []
    for case in names:
        model = tiny_model(case, seed=3, attn="eager" if case.startswith("gemma2") else "sdpa")
        gen = torch.Generator().manual_seed(7)
        seqs = [torch.randint(0, VOCAB, (1, T), generator=gen) for T in LENGTHS]
        words = [_words(s.shape[1], i) for i, s in enumerate(seqs)]
        sources = [(12, [3, 7]), None, (21, [0, 20])]
        for padding in ("right", "left"):
            kw = dict(words=words, sources=sources, padding_side=padding)
            cpu = prediction_stats_batch(model.cpu(), seqs, TAUS, backend="cpu", **kw)
            model.to(device)
            ref = prediction_stats_batch(model, seqs, TAUS, backend="torch", **kw)  # the same activations
            got = prediction_stats_batch(model, seqs, TAUS, backend="triton", **kw)
            worst, lists, differ = _compare(ref, got)
            far, _, far_differ = _compare(cpu, got)  # another forward pass (CPU): its rounding on top
            ok = worst < 2e-5 and differ == 0
            print(f"{'ok  ' if ok else 'FAIL'} {case:<16} {padding:<5} float32 vs torch backend: largest difference "
                  f"{worst:.1e}, {lists} route/pruned lists, {differ} differ; vs the CPU kernel on the CPU: "
                  f"{far:.1e}, {far_differ} differ", flush=True)
            if not ok:
                failures.append(f"{case} {padding}")
        model.cpu()
    return failures


def bf16_path(device: str, tiny: bool) -> list[str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    import flowray
    from flowray.kernels import KernelConfig
    from flowray.stats import prediction_stats_batch

    failures = []
    d, H, dh, L, lengths = (64, 4, 16, 2, (9, 70, 17)) if tiny else (1024, 8, 128, 4, (200, 256, 77, 256))
    dtype = torch.float32 if tiny else torch.bfloat16
    cfg = LlamaConfig(vocab_size=1000, hidden_size=d, intermediate_size=3 * d, num_hidden_layers=L,
                      num_attention_heads=H, num_key_value_heads=H // 2, head_dim=dh, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 1000, (1, T), generator=gen) for T in lengths]
    ref = prediction_stats_batch(model, seqs, TAUS, backend="torch")
    base = KernelConfig()
    configs = {"default": base, "1 coordinate per tile": replace(base, tile_coords=1, list_coords=2),
               "full lists": replace(base, list_share=1 << 40),
               "source windows": replace(base, f_budget=len(seqs) * H * d * 64),
               "1 hit slot": replace(base, hits_per_node=1),
               "row chunks, recomputed weights": replace(base, element_budget=len(seqs) * H * max(lengths) * 40)}
    for label, config in configs.items():
        t0 = time.perf_counter()
        got = prediction_stats_batch(model, seqs, TAUS, backend="triton", kernel_config=config)
        worst, lists, differ = _compare(ref, got)
        ok = worst < 1e-4 and differ == 0
        print(f"{'ok  ' if ok else 'FAIL'} {dtype} Llama d={d} dh={dh} vs torch backend, {label}: largest difference "
              f"{worst:.1e}, {lists} lists, {differ} differ ({time.perf_counter() - t0:.1f} s)", flush=True)
        if not ok:
            failures.append(f"bf16 {label}")
    for padding in ("right", "left"):
        a = flowray.edge_importances_batch(model, seqs, backend="torch", padding_side=padding)
        b = flowray.edge_importances_batch(model, seqs, backend="triton", padding_side=padding)
        worst = max(float(np.abs(x.attn - y.attn).max()) for x, y in zip(a, b))
        worst = max(worst, *(float(np.abs(x.ffn - y.ffn).max()) for x, y in zip(a, b)))
        ok = worst < 1e-4
        print(f"{'ok  ' if ok else 'FAIL'} {dtype} dense API vs torch backend, {padding} padding: largest "
              f"difference {worst:.1e}", flush=True)
        if not ok:
            failures.append(f"dense {padding}")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="on the CPU (set TRITON_INTERPRET=1): two families")
    ap.add_argument("--all-families", action="store_true")
    ap.add_argument("--families", default=None, help="comma-separated tiny families to check (default: eight)")
    args = ap.parse_args()
    from tiny_models import CASES, NEW_CASES

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine, or pass --tiny with TRITON_INTERPRET=1")
    if args.tiny and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--tiny runs the Triton programs on the CPU: set TRITON_INTERPRET=1")
    print(f"# {device_name(device)}; torch {torch.__version__}", flush=True)
    names = ["llama-gqa", "neox-parallel"] if args.tiny else CASES + NEW_CASES if args.all_families else REPRESENTATIVE
    if args.families:
        names = args.families.split(",")
    failures = bf16_path(device, args.tiny) + families(device, names)
    print("ALL OK" if not failures else f"FAILED: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
