"""Edge-importance speed and memory on SmolLM2 (CPU), measured side by side in one run.

For each length T, fresh processes load the model and time each method interleaved with a plain forward
pass, best of ``--repeats`` (one process per method, so no method runs after another's allocations):

- ``forward``: a plain forward pass (the model's default attention, no hooks);
- ``flowray``: ``edge_importances`` with the default backend (capture included): the compiled CPU loop;
- ``torch``: ``edge_importances(backend="torch")``, the vectorised torch path (chunks + ragged gathers),
  which is what flowray ran on the CPU before the compiled loop and what it runs on GPUs;

and, in one fresh process per method, the peak resident memory of one run (``VmHWM``, reset just
before it, after every method has run once on 16 tokens so libraries and compiled code are resident):
the ``extra`` columns are a method's peak minus the plain forward's peak, next to the result's own size.
The materialising algorithm of the official implementation (``tests/reference.py::materialising_importances``,
a ``[T, T, H, d]`` tensor per layer) runs in its own process where it fits in memory.

The targets are checked at the end: flowray at most 1.5x the forward pass at 256 tokens, and at
1024 tokens extra peak memory at most the outputs plus 10%.

    python bench/importance_speed.py                        # T = 64 128 256 512 1024
    python bench/importance_speed.py --lengths 256 --repeats 7 --no-naive
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from flowray.config import find_shared_data  # noqa: E402  (light: no torch)

C4 = (find_shared_data() or REPO.parent / "shared" / "data") / "c4_sample" / "c4_en_sample_1000.jsonl"
L, H, D = 30, 9, 576  # SmolLM2-135M


def _text() -> str:
    """Real prose: the shared C4 sample if present, else Python's own documentation topics."""
    if C4.is_file():
        with C4.open() as fh:
            return " ".join(json.loads(next(fh))["text"] for _ in range(40))
    from pydoc_data.topics import topics

    return " ".join(topics[k] for k in sorted(topics))


def _text_source() -> str:
    """What ``_text`` returns, for the header (the fallback is not C4)."""
    return "C4 text (shared sample)" if C4.is_file() else "pydoc topics text (the shared C4 sample is absent)"


def _peak_mb() -> float:
    """This process's resident high-water mark (VmHWM) since the last ``_reset_peak``."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:  # "5" resets the high-water mark (Linux >= 4.0)
        fh.write("5")


def _setup(T: int, methods: list[str]):
    """Load SmolLM2 and T tokens of prose; return the runnable methods by name."""
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    import flowray

    lm = flowray.load_model("smollm2", device="cpu")
    ids = lm.tokenizer(_text(), return_tensors="pt").input_ids[:, :T]
    if ids.shape[1] != T:
        raise SystemExit(f"the sample text has only {ids.shape[1]} tokens, fewer than T={T}")

    def forward(x=ids):
        with torch.no_grad():
            lm.model(input_ids=x, use_cache=False)

    runs = {"forward": forward}
    if "flowray" in methods:
        runs["flowray"] = lambda x=ids: flowray.edge_importances(lm, x)
    if "torch" in methods:
        runs["torch"] = lambda x=ids: flowray.edge_importances(lm, x, backend="torch")
    if "naive" in methods:
        from reference import materialising_importances

        runs["naive"] = lambda x=ids: materialising_importances(lm.model, x)
    return runs, ids


def child_time(T: int, repeats: int, methods: list[str]) -> dict:
    """Warm every method up, then time them interleaved; best and median seconds per method."""
    runs, _ = _setup(T, methods)
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: {"seconds": min(ts), "median": sorted(ts)[len(ts) // 2]} for name, ts in times.items()}


def child_memory(T: int, method: str) -> dict:
    """Peak resident memory of one run of ``method`` at T, in a process where every method has already run
    once on 16 tokens (so libraries and compiled code are resident, but no pool has grown to T yet)."""
    runs, ids = _setup(T, sorted({"forward", "flowray", "torch", method}))
    for run in runs.values():  # the same warm-up in every memory process, whichever method it measures
        run(ids[:, :16])
    _reset_peak()
    runs[method]()
    return {"peak_mb": _peak_mb()}


def _child(kind: str, *args) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, *map(str, args)],
        capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"},
    )
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        return {"error": err}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _naive_fits(T: int) -> bool:
    """The materialising algorithm holds ~3 float32 [T, T, H, d] tensors at once."""
    need = 3 * T * T * H * D * 4
    avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return need < 0.6 * avail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-naive", action="store_true", help="skip the materialising algorithm")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch backend")
    args = ap.parse_args()
    import torch

    print(f"# SmolLM2-135M ({L} layers, {H} heads, d={D}), CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"# {_text_source()}; best of {args.repeats} runs (naive: {max(1, args.repeats // 2)}) after a warm-up, each method interleaved with a forward pass in its own "
          "process (ratios are to that forward pass); extra MB = peak RSS of one run minus the plain forward's, "
          "one fresh process per (method, T)")
    print(f"{'T':>5} {'forward s':>10} {'flowray s':>10} {'torch s':>8} {'naive s':>8} {'flowray/fwd':>12} "
          f"{'torch/fwd':>10} {'naive/fwd':>10} {'output MB':>10} {'flowray extra MB':>17} {'extra/output':>13} "
          f"{'torch extra MB':>15} {'naive extra MB':>15}")
    verdicts = []
    for T in args.lengths:
        # each method is timed against a forward pass in its own process: a method that allocates a lot
        # (torch, naive) leaves the allocator in a state that would slow whatever runs after it
        res = _child("time", T, args.repeats, "forward,flowray")
        if "error" in res:
            print(f"{T:>5}  failed: {res['error']}")
            continue
        methods = ["forward", "flowray"]
        others = ([] if args.no_torch else ["torch"]) + (["naive"] if not args.no_naive and _naive_fits(T) else [])
        for m in others:
            pair = _child("time", T, args.repeats if m == "torch" else max(1, args.repeats // 2), f"forward,{m}")
            if "error" not in pair:  # the ratio to the forward pass timed beside it, in seconds of that run
                pair[m]["ratio"] = pair[m]["seconds"] / pair["forward"]["seconds"]
                res[m] = pair[m]
                methods.append(m)
        for m in methods:
            res[m].update(_child("memory", T, m))
        fwd, flo, tor, nv = res["forward"], res["flowray"], res.get("torch"), res.get("naive")
        out_mb = L * H * T * T * 4 / 2**20 + 4 * L * T * 4 / 2**20  # attn [L, H, T, T] + four [L, T] float32
        extra = flo["peak_mb"] - fwd["peak_mb"]

        def ratio(x):
            return f"{x.get('ratio', x['seconds'] / fwd['seconds']):.2f}" if x else "-"

        def sec(x):
            return f"{x['seconds']:.3f}" if x else "-"

        def mb(x):
            return f"{x['peak_mb'] - fwd['peak_mb']:.0f}" if x and "peak_mb" in x else "-"

        print(f"{T:>5} {fwd['seconds']:>10.3f} {flo['seconds']:>10.3f} {sec(tor):>8} {sec(nv):>8} "
              f"{ratio(flo):>12} {ratio(tor):>10} {ratio(nv):>10} {out_mb:>10.0f} {extra:>17.0f} "
              f"{extra / out_mb:>13.2f} {mb(tor):>15} {mb(nv):>15}", flush=True)
        if T == 256:
            r = flo["seconds"] / fwd["seconds"]
            verdicts.append(f"T=256: flowray/forward = {r:.2f} (target <= 1.5): {'met' if r <= 1.5 else 'NOT met'}")
        if T == 1024:
            verdicts.append(f"T=1024: extra peak {extra:.0f} MB vs outputs {out_mb:.0f} MB, ratio "
                            f"{extra / out_mb:.3f} (target <= 1.10): {'met' if extra <= 1.1 * out_mb else 'NOT met'}")
        if tor or nv:  # the ratios the README quotes between methods (each timed in its own process)
            parts = [f"torch/flowray time {tor['seconds'] / flo['seconds']:.2f}"] if tor else []
            if nv:
                parts.append(f"naive/flowray time {nv['seconds'] / flo['seconds']:.1f}")
                if "peak_mb" in nv and extra > 0:
                    parts.append(f"naive/flowray extra memory {(nv['peak_mb'] - fwd['peak_mb']) / extra:.1f}")
            print(f"#   T={T}: " + ", ".join(parts) + " (seconds from separate processes)", flush=True)
        if not args.no_naive and not _naive_fits(T):
            print(f"#   naive at T={T}: skipped, does not fit in memory")
    for v in verdicts:
        print("# " + v)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, T = sys.argv[2], int(sys.argv[3])
        result = (child_time(T, int(sys.argv[4]), sys.argv[5].split(",")) if kind == "time"
                  else child_memory(T, sys.argv[4]))
        print(json.dumps(result))
        sys.exit(0)
    sys.exit(main())
