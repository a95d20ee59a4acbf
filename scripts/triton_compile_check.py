"""Compile flowray's Triton programs for NVIDIA GPUs on a machine without one, and report their resources.

The test suite runs the programs under Triton's interpreter, which checks what they compute but not that
they compile: a GPU machine's first run would be the first compile. This builds every program in the
variants the GPU backend launches (bfloat16 and float32 models) for the targets given (default sm_90,
Hopper; sm_80, Ampere) with the installed triton and its bundled ptxas, then prints registers, spills
and shared memory per program (from the bundled cuobjdump).

    python scripts/triton_compile_check.py                 # sm_90 and sm_80
    python scripts/triton_compile_check.py --arch 90

Loads ``flowray/kernels/triton_jit.py`` by path, so only triton is needed (any version the GPU machines
use: install it in a scratch virtualenv to check another one).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
ROOT = Path(__file__).resolve().parents[1]


def _load_programs():
    spec = importlib.util.spec_from_file_location("triton_jit", ROOT / "flowray" / "kernels" / "triton_jit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _variants():
    """``(program, {name: type}, {constexpr: value}, num_warps, label)`` as the GPU backend launches them."""
    i32 = "i32"
    for wt, exact in (("bf16", False), ("fp32", True)):
        gemm, warps, bt = ((128, 128, 32), 8, 64) if not exact else ((64, 64, 16), 4, 32)  # as the launcher
        yield ("sign_gemm", dict(y_ptr="*fp32", w_ptr=f"*{wt}", out_ptr="*fp32", M=i32, N=i32, K=i32, s_ym=i32,
                                 s_wk=i32, s_wn=i32, s_om=i32),
               dict(BM=gemm[0], BN=gemm[1], BK=gemm[2], EXACT=exact), warps, wt)
        yield ("head_outputs_t", dict(v_ptr=f"*{wt}", w_ptr=f"*{wt}", ft_ptr="*fp32", fmax_ptr="*fp32", H=i32, d=i32,
                                      dh=i32, group=i32, t0=i32, TF=i32, T=i32, s_vg=i32, s_vh=i32, s_vt=i32, s_ve=i32,
                                      s_wk=i32, s_wn=i32),
               dict(BT=bt, BK=bt, DH=128, STORE=True, EXACT=exact), 4, wt)
        yield ("prox_tiles", dict(gs_ptr="*fp32", v_ptr=f"*{wt}", probs_ptr=f"*{wt}", scale_ptr="*fp32",
                                  fmax_ptr="*fp32", ft_ptr="*fp32", y_ptr="*fp32", sy_ptr="*fp32", sidx_ptr="*i64",
                                  sabs_ptr="*fp32", start_ptr="*i32", len_ptr="*i32", prox_ptr="*fp32",
                                  count_ptr="*i32", mid_ptr="*i64", big_ptr="*i64", H=i32, C=i32, J=i32, d=i32,
                                  dh=i32, group=i32, p0=i32, js=i32, je=i32, TF=i32, n_jbw=i32, cap_mid=i32,
                                  cap_big=i32, s_gs=i32, s_vg=i32, s_vh=i32, s_vt=i32, s_ve=i32, s_pg=i32, s_ph=i32,
                                  s_pr=i32, s_pj=i32, s_sg=i32, s_sr=i32),
               dict(W1=8, W1P=8, W2=64, BP=16 if not exact else 32, BJ=64 if not exact else 32, DH=128, EC=32, BK=4,
                    HAS_SCALE=False, SPLIT=not exact), 4, wt)
        for width, pb in ((32, 32), (128, 8)):
            yield ("prox_list", dict(list_ptr="*i64", count_ptr="*i32", cap=i32, prox_ptr="*fp32", probs_ptr=f"*{wt}",
                                     scale_ptr="*fp32", fmax_ptr="*fp32", ft_ptr="*fp32", sy_ptr="*fp32",
                                     sidx_ptr="*i64", sabs_ptr="*fp32", H=i32, C=i32, J=i32, d=i32, js=i32, TF=i32,
                                     n_prog=i32, s_pg=i32, s_ph=i32, s_pr=i32, s_pj=i32, s_sg=i32, s_sr=i32),
                   dict(PB=pb, WQ=width, HAS_SCALE=True), 4, f"{wt} WQ={width}")
        yield ("finish_rows", dict(prox_ptr="*fp32", y_ptr="*fp32", z0_ptr=f"*{wt}", z1_ptr="*fp32", start_ptr="*i32",
                                   len_ptr="*i32", wi_ptr="*i32", src_ptr="*i32", query_ptr="*i64",
                                   direct_ptr="*fp32", hs_ptr="*fp32", prev_ptr="*fp32", same_ptr="*fp32",
                                   srco_ptr="*fp32", hit_h_ptr="*i32", hit_j_ptr="*i32", hit_v_ptr="*fp32",
                                   hit_n_ptr="*i32", H=i32, C=i32, J=i32, d=i32, p0=i32, tau="fp32", M=i32,
                                   s_z0g=i32, s_z0r=i32, s_z0d=i32, s_z1g=i32, s_z1r=i32, s_z1d=i32, s_wg=i32,
                                   s_dk=i32, s_dg=i32, s_dr=i32, s_og=i32, s_oh=i32, s_or=i32, s_sg=i32, s_hg=i32,
                                   s_hr=i32, s_ng=i32, s_nr=i32),
               dict(K=1, BR=8, BJ=128, BD=128, WORDS=True, SOURCE=True, HITS=True, SCALE_SUB=False), 4, wt)
    yield ("direct_rows", dict(y_ptr="*fp32", z_ptr="*fp32", out_ptr="*fp32", N="i32", d="i32", s_zn="i32",
                               s_zd="i32", s_ok="i32", s_on="i32"), dict(BR=16, BD=128), 4, "fp32")


def _resources(cubin: bytes) -> str:
    """Registers, spills and shared memory from the cubin (triton's bundled cuobjdump)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", fh.name], capture_output=True, text=True).stdout
    found = {key: re.search(rf"{key}:(\d+)", text) for key in ("REG", "STACK", "SHARED", "LOCAL")}
    return " ".join(f"{k.lower()} {m.group(1)}" for k, m in found.items() if m)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    args = ap.parse_args()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    programs = _load_programs()
    failed = 0
    print(f"# triton {triton.__version__}")
    for arch in args.arch:
        for name, sig, consts, warps, label in _variants():
            fn = getattr(programs, name)
            signature = {**sig, **{k: "constexpr" for k in consts}}
            try:
                k = triton.compile(ASTSource(fn, signature, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                                   options={"num_warps": warps})
                print(f"sm_{arch} {name:<15} {label:<12} ok   {_resources(k.asm['cubin'])} "
                      f"dynamic shared {k.metadata.shared}", flush=True)
            except Exception as exc:  # noqa: BLE001 - report every program, then fail
                failed += 1
                print(f"sm_{arch} {name:<15} {label:<12} FAILED: {str(exc).splitlines()[0][:300]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
