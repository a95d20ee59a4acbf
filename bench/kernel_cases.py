"""Which exact case the CPU kernel takes for each attention sub-edge of SmolLM2, per length.

``flowray.kernels.cpu_loops`` sorts every sub-edge ``(h, pos, j)`` into one of four cases (see its docstring):
proximity 0 (``a s.F <= 0``); no coordinate can overshoot (``a max|F| <= min|y|``); only the FEW
smallest coordinates of ``|y|`` can (``a max|F| <=`` the next smallest); or all of them. This prints the
share of each, which is what the kernel's speed depends on.

    python bench/kernel_cases.py --lengths 256 1024
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from importance_speed import _text, _text_source  # noqa: E402  (same prose as the speed benchmark)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    args = ap.parse_args()
    import flowray
    from flowray.capture import capture_layers
    from flowray.kernels import KernelConfig
    from flowray.importance import head_outputs

    lm = flowray.load_model("smollm2", device="cpu")
    layers = lm.adapter.layers()
    FEW = KernelConfig().few
    print(f"# SmolLM2-135M, {_text_source()}, every layer; FEW = {FEW}")
    print(f"{'T':>5} {'sub-edges':>10} {'prox 0':>8} {'no overshoot':>13} {'few coords':>11} {'all coords':>11} "
          f"{'few / corrected':>16}")
    for T in args.lengths:
        ids = lm.tokenizer(_text(), return_tensors="pt").input_ids[:, :T]
        counts = torch.zeros(4, dtype=torch.long)

        def consume(rec):
            w_o = lm.adapter.output_projection(layers[rec.layer])[0].detach().float()  # [H, dh, d]
            y = (rec.inputs[0] + rec.attn_out[0]).float()  # [T, d] the attention node
            F = head_outputs(rec.values[0].float(), w_o)  # [H, T, d]
            a = rec.probs[0].float()  # [H, T, T]
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            lin = a * torch.einsum("pd,hjd->hpj", torch.ones_like(y).copysign_(y), F)  # a (s . F)
            thr = a * F.abs().amax(-1)[:, None, :]  # a max|F_hj|
            small = y.abs().sort(-1).values  # [T, d]
            bound = small[:, FEW] if y.shape[1] > FEW else torch.full((T,), float("inf"))
            zero = causal & ~(lin > 0)
            none = causal & (lin > 0) & (thr <= small[:, :1][None])
            few = causal & (lin > 0) & (thr > small[:, :1][None]) & (thr <= bound[None, :, None])
            rest = causal & (lin > 0) & (thr > bound[None, :, None])
            for i, m in enumerate((zero, none, few, rest)):
                counts[i] += int(m.sum())

        with torch.no_grad(), capture_layers(lm.model, lm.adapter, consume, reuse_probs=True):
            lm.model(input_ids=ids, use_cache=False)
        n = int(counts.sum())
        share = (counts.double() / n).tolist()
        corrected = int(counts[2] + counts[3])
        print(f"{T:>5} {n:>10} {share[0]:>8.1%} {share[1]:>13.1%} {share[2]:>11.1%} {share[3]:>11.1%} "
              f"{int(counts[2]) / max(1, corrected):>16.1%}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
