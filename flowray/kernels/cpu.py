"""The CPU backend: numba-compiled loops (``cpu_loops``) after torch's matrix products.

Each sub-edge is visited once and takes its cheapest exact case (no correction, the ``few`` smallest
coordinates of ``|y|``, or all of them); results are written in place and normalised there too.
"""

from __future__ import annotations

import torch

from flowray.kernels import cpu_loops
from flowray.kernels.base import HeadOutputs, Kernel, float32_head_outputs


def _f_max(F: torch.Tensor) -> torch.Tensor:
    """``max |F|`` over ``d`` by the compiled loops, ``[(G,) H, T]``."""
    base = F if F.dim() == 3 else F.transpose(0, 1)  # contiguous: [H, T, d] or [H, G, T, d]
    T, d = F.shape[-2:]
    f_max = torch.from_numpy(cpu_loops.f_max(base.reshape(-1, T, d).numpy(), torch.get_num_threads()))
    return f_max.view(base.shape[:-1]) if F.dim() == 3 else f_max.view(base.shape[:-1]).transpose(0, 1)


class CpuKernel(Kernel):
    name = "cpu"

    def head_outputs(self, values, w_o, w_flat=None) -> HeadOutputs:
        return float32_head_outputs(values, w_o, w_flat, _f_max)

    def sub_edge_block(self, y, probs, heads: HeadOutputs, p0: int = 0, *, out=None) -> torch.Tensor:
        G, H, C, J = probs.shape
        if out is None:
            out = torch.empty(G, H, C, J, dtype=torch.float32)
        y, probs = y.float(), probs.float()
        values = heads.values  # [G, H_kv, T, dh]
        H_kv, dh = values.shape[1], heads.w_o.shape[1]
        # sign(y) with -1 for -0.0: any sign works where y_d = 0 (|0 - aF| = -a s F + 2 relu(a s F) for
        # s = +-1), and copysign is 10x faster than a where()
        s = torch.ones_like(y).copysign_(y)  # [G, C, d]
        Gs = (s.view(G * C, -1) @ heads.w_flat).view(G, C, H, dh).transpose(1, 2)  # [G, H, C, dh] s_p W_O^h^T
        # s_p . F_hj = G_hp . v_j, one GEMM per kv head: its query heads' rows of G stacked ([group * C, dh])
        torch.matmul(Gs.reshape(G, H_kv, -1, dh), values[:, :, :J].transpose(-1, -2), out=out.view(G, H_kv, -1, J))
        # the loops read F and f_max head-major ([H, G, ...]: how head_outputs lays a batch out) and compile
        # for contiguous arrays: a strided F view made them 2x slower (their O(d) loops no longer vectorise)
        F, f_max = heads.F.transpose(0, 1).contiguous(), heads.f_max.transpose(0, 1).contiguous()
        cpu_loops.prox_rows(out.numpy(), probs.contiguous().numpy(), F.numpy(), f_max.numpy(),
                            y.contiguous().numpy(), p0, torch.get_num_threads(), self.config.few)
        return out

    def finish_block(self, sub, y, parts, p0: int = 0) -> torch.Tensor:
        G, C = y.shape[:2]
        sub_np = torch.zeros(G, 0, C, C).numpy() if sub is None else sub.numpy()
        stacked = torch.stack([z.float() for z in parts]).contiguous().numpy()  # [K, G, C, d]
        direct = cpu_loops.normalise_rows(sub_np, y.float().contiguous().numpy(), stacked, p0,
                                          torch.get_num_threads())
        return torch.from_numpy(direct)

    def direct_node(self, y, parts):
        return self.finish_block(None, y[None], [z[None] for z in parts], 0)[:, 0]

    def plan(self, spans, H, budget):
        """Consecutive whole sequences that start at position 0 (right padding) share one block on their
        padded grid while its ``[G, H, T, T]`` importances fit ``budget``: for short texts the calls' fixed
        costs, not the arithmetic, are most of the time. Every other sequence is a block of its own."""
        out: list[list[int]] = []  # [first, stop, T_grid]
        for b, (start, T) in enumerate(spans):
            if out and start == 0 and spans[out[-1][0]][0] == 0:
                first, stop, T_grid = out[-1]
                G, T_max = stop - first + 1, max(T, T_grid)
                if G * H * T_max * T_max <= budget:
                    out[-1] = [first, b + 1, T_max]
                    continue
            out.append([b, b + 1, T])
        return [(first, stop, spans[first][0], T_grid) for first, stop, T_grid in out]
