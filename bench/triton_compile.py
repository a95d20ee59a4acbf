"""Every Triton program of the GPU path, compiled for a GPU on a machine without one: registers, spills,
shared memory and the occupancy they allow.

The job path (``prediction_stats_batch``: 3 taus, word splits, hit slots) and the dense API
(``edge_importances``) run on CPU tensors of a Llama of the chosen shape (its layers cut to one, its
vocabulary to 512; neither changes a kernel) in bfloat16, with the Triton backend's launches recorded
instead of run: the launcher passes what it would pass on a GPU (tiles, ``SPLIT``, ``EXACT``, warps; only
``TRITON_INTERPRET=1`` changes them). Each distinct specialisation is then compiled by Triton's own compiler
for the target (``--arch 90``: H100 and H200) as a launch on a GPU would compile it (a pointer's 16-byte
alignment and an integer's divisibility by 16 or value 1 specialise as Triton's launcher does), and its
cubin's resource use is read with the ``cuobjdump`` that Triton ships (``spec``: specialisations of a
row's constants, which differ only in alignment or a size of 1; the row shows the one with most registers). Without a GPU this says that every
program compiles with the installed Triton (run it with the GPU machine's version too), and what limits
its occupancy; it says nothing of time.

    python bench/triton_compile.py                          # llama2-7b, llama3-8b, smollm2 shapes, sm_90
    python bench/triton_compile.py --shapes smollm2 --arch 80
    python bench/triton_compile.py --json compile.json
    python bench/triton_compile.py --shapes llama2-7b --set prox_tiles:BJ=32 --set head_outputs_t:BT=32,BK=32

``--set PROGRAM:NAME=VALUE,...`` changes a program's launch constants or warps (``num_warps``) before it
is compiled: what a change of tiles would do to its registers and occupancy, before any GPU runs it.

The exit status is 1 when a program does not compile (each failure printed), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter's launches have other tiles: not these
    print("triton_compile.py: TRITON_INTERPRET=1 would record the interpreter's launches, not a GPU's; unset it "
          "(this script compiles the GPU programs and runs none)", file=sys.stderr)
    raise SystemExit(2)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default up to 3.9 (which warns when unset)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from gpu_common import SHAPES, build  # noqa: E402

TAUS = (0.01, 0.03, 0.04)
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
          torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
REGS_PER_SM, MAX_WARPS_PER_SM = 65536, 64  # sm_80 and sm_90
SMEM_PER_SM = {80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024, 90: 228 * 1024}


class Recorder:
    """Stands in for one ``@triton.jit`` program: ``program[grid](*args, **kw)`` records the launch and
    zeroes its tensors instead of running it, so that what the host reads afterwards is the same every run."""

    def __init__(self, name: str, fn, launches: list):
        self.name, self.fn, self.launches = name, fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, self.fn, args, kwargs))
            for a in (*args, *kwargs.values()):
                if isinstance(a, torch.Tensor):
                    a.zero_()
        return launch


def record(shape: str) -> list:
    """The Triton launches of the job path and of the dense API on one layer of ``shape``, bfloat16, CPU."""
    import flowray.kernels as kernels
    from flowray.api import edge_importances
    from flowray.kernels import triton_jit
    from flowray.stats import prediction_stats_batch

    launches: list = []
    L, H, H_kv, d, ffn, _ = SHAPES[shape]
    SHAPES[f"{shape}/1"] = (1, H, H_kv, d, ffn, 512)
    model = build(f"{shape}/1", "cpu", torch.bfloat16, context=256)
    programs = {name: getattr(triton_jit, name) for name in dir(triton_jit)
                if type(getattr(triton_jit, name)).__name__ == "JITFunction"}
    resolve = kernels.resolve_backend
    try:
        for name, fn in programs.items():
            setattr(triton_jit, name, Recorder(name, fn, launches))
        kernels.resolve_backend = lambda backend, device: "triton"  # the CPU stands in for the GPU
        gen = torch.Generator().manual_seed(0)
        texts = [torch.randint(0, 512, (1, n), generator=gen) for n in (37, 23)]
        words = [(torch.arange(t.shape[1]) // 2, torch.arange(t.shape[1]) % 2 == 0) for t in texts]
        prediction_stats_batch(model, texts, TAUS, words=words, backend="triton")  # on zeros, as nothing ran
        edge_importances(model, texts[0], backend="triton")
    finally:
        for name, fn in programs.items():
            setattr(triton_jit, name, fn)
        kernels.resolve_backend = resolve
    return launches


def specialise(fn, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """Triton's signature, compile-time constants, attributes and options for one recorded launch."""
    sig, constexprs, attrs = {}, {}, {}
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k not in options})
    for i, p in enumerate(fn.params):
        v = bound[p.name]
        if p.is_constexpr or v is None:
            sig[p.name], constexprs[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + DTYPES[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            if v == 1 and not p.do_not_specialize:
                sig[p.name], constexprs[(i,)] = "constexpr", 1
                continue
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0 and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(v).__name__}")
    return sig, constexprs, attrs, options


def resources(cubin: bytes, cuobjdump: str) -> dict:
    """Registers per thread, local memory (spills and stack) per thread, static shared memory per block."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k.lower(): int(v) for k, v in fields.items()}


def occupancy(regs: int, warps: int, smem: int, arch: int) -> int:
    """Warps resident per multiprocessor, bounded by registers, shared memory and the warp limit."""
    per_block = regs * 32 * warps
    blocks = REGS_PER_SM // per_block if per_block else MAX_WARPS_PER_SM // warps
    if smem:
        blocks = min(blocks, SMEM_PER_SM.get(arch, 100 * 1024) // smem)
    return min(blocks * warps, MAX_WARPS_PER_SM // warps * warps)


def compile_all(launches: list, arch: int) -> tuple[list[dict], list[str]]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    seen, rows, failures = set(), [], []
    for name, fn, args, kwargs in launches:
        sig, constexprs, attrs, options = specialise(fn, args, kwargs)
        key = (name, tuple(sorted(sig.items())), tuple(sorted((k, repr(v)) for k, v in constexprs.items())),
               tuple(sorted(attrs)), tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        consts = {fn.arg_names[k[0]]: v for k, v in constexprs.items() if fn.params[k[0]].is_constexpr}
        try:
            kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                    options=options)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{name} {consts}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        use = resources(kernel.asm["cubin"], cuobjdump)
        warps = kernel.metadata.num_warps
        smem = max(kernel.metadata.shared, use.get("shared", 0))
        rows.append(dict(program=name, constants=consts, warps=warps, stages=kernel.metadata.num_stages,
                         regs=use.get("reg", 0), local_bytes=use.get("local", 0), stack_bytes=use.get("stack", 0),
                         shared_bytes=smem, warps_per_sm=occupancy(use.get("reg", 0), warps, smem, arch)))
    return rows, failures


def overrides(items: list[str], ap) -> dict[str, dict]:
    """``--set prox_tiles:BJ=32,num_warps=8`` -> ``{"prox_tiles": {"BJ": 32, "num_warps": 8}}``."""
    out: dict[str, dict] = {}
    for item in items:
        program, colon, pairs = item.partition(":")
        try:
            values = {k: int(v) for k, v in (pair.split("=") for pair in pairs.split(","))}
        except ValueError:
            values = {}
        if not colon or not values:
            ap.error(f"--set {item!r}: expected PROGRAM:NAME=INTEGER[,NAME=INTEGER...], e.g. prox_tiles:BJ=32")
        out.setdefault(program, {}).update(values)
    return out


def _short(consts: dict) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in consts.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="llama2-7b,llama3-8b,smollm2")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10: 90 (H100/H200), 80 (A100)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="PROGRAM:NAME=VALUE,...",
                    help="change a program's launch constants before compiling (repeatable)")
    args = ap.parse_args()
    changes = overrides(args.set, ap)
    shapes = [s for s in args.shapes.split(",") if s]
    bad = [s for s in shapes if s not in SHAPES]
    if bad or not shapes:
        ap.error(f"unknown shape(s) {bad}; expected some of {','.join(SHAPES)}")
    if args.arch not in SMEM_PER_SM:
        ap.error(f"--arch {args.arch}: expected one of {sorted(SMEM_PER_SM)}")
    import triton

    print(f"# triton {triton.__version__}, torch {torch.__version__}; target sm_{args.arch}; programs as the "
          "GPU path launches them, bfloat16 models")
    print(f"{'shape':<10} {'program':<15} {'spec':>4} {'warps':>5} {'regs':>4} {'spill_B':>7} {'smem_kB':>7} "
          f"{'warps/SM':>8}  constants")
    out, failed = [], []
    for shape in shapes:
        launches = [(name, fn, a, {**kw, **changes.get(name, {})}) for name, fn, a, kw in record(shape)]
        unknown = set(changes) - {name for name, *_ in launches}
        if unknown:
            ap.error(f"--set: no launch of {sorted(unknown)}; programs: {sorted({n for n, *_ in launches})}")
        for name, fn, *_ in launches:
            allowed = {q.name for q in fn.params if q.is_constexpr} | {"num_warps", "num_stages"}
            if set(changes.get(name, {})) - allowed:
                ap.error(f"--set {name}: {sorted(set(changes[name]) - allowed)} is not among its constants "
                         f"{sorted(allowed)}")
        rows, failures = compile_all(launches, args.arch)
        if not rows and not failures:
            failures.append("no Triton launch was recorded")
        worst: dict = {}  # specialisations that differ only in alignment or a size of 1: the heaviest one
        for r in rows:
            key = (r["program"], _short(r["constants"]), r["warps"])
            n = worst.get(key, (None, 0))[1] + 1
            if key not in worst or r["regs"] > worst[key][0]["regs"]:
                worst[key] = (r, n)
            else:
                worst[key] = (worst[key][0], n)
        for r, n in worst.values():
            print(f"{shape:<10} {r['program']:<15} {n:>4} {r['warps']:>5} {r['regs']:>4} {r['local_bytes']:>7} "
                  f"{r['shared_bytes'] / 1024:>7.1f} {r['warps_per_sm']:>8}  {_short(r['constants'])}")
        for f in failures:
            print(f"{shape:<10} DOES NOT COMPILE: {f}")
        out += [dict(shape=shape, **r) for r in rows]
        failed += [f"{shape}: {f}" for f in failures]
    if args.json:
        Path(args.json).write_text(json.dumps(dict(triton=triton.__version__, arch=args.arch, programs=out,
                                                   failures=failed), indent=1, default=str))
    print(f"# {len(out)} programs compiled, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
