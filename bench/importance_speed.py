"""Edge-importance speed and memory on SmolLM2, measured side by side in one run.

For each length T it prints: a plain forward pass (the model's default attention), flowray's
``edge_importances`` (capture included), and the materialising algorithm of the official implementation
(``tests/reference.py::materialising_importances``, a ``[T, T, H, d]`` tensor per layer) where it fits in
memory; the ratios to the forward pass; and each method's peak extra resident memory over a warmed-up
forward pass, measured in a fresh process per (method, T).

    python bench/importance_speed.py                 # T = 64 128 256 512
    python bench/importance_speed.py --lengths 256 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
C4 = REPO.parent / "shared" / "data" / "c4_sample" / "c4_en_sample_1000.jsonl"


def _text() -> str:
    """Real prose: the shared C4 sample if present, else Python's own documentation topics."""
    if C4.is_file():
        with C4.open() as fh:
            return " ".join(json.loads(next(fh))["text"] for _ in range(20))
    from pydoc_data.topics import topics

    return " ".join(topics[k] for k in sorted(topics))


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def child(method: str, T: int, repeats: int) -> dict:
    """Run in a fresh process: load, warm up with a forward pass, then time `method`."""
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    import flowray

    lm = flowray.load_model("smollm2", device="cpu")
    ids = lm.tokenizer(_text(), return_tensors="pt").input_ids[:, :T]
    assert ids.shape[1] == T, f"text too short for T={T}"
    with torch.no_grad():
        lm.model(input_ids=ids, use_cache=False)  # warm-up: allocator, kernels
    base = _maxrss_mb()
    if method == "forward":
        def run():
            with torch.no_grad():
                lm.model(input_ids=ids, use_cache=False)
    elif method == "flowray":
        def run():
            flowray.edge_importances(lm, ids)
    elif method == "naive":
        from reference import materialising_importances

        def run():
            materialising_importances(lm.model, ids)
    else:
        raise ValueError(method)
    run()  # warm-up of the method itself
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"seconds": min(times), "median": sorted(times)[len(times) // 2], "peak_extra_mb": _maxrss_mb() - base}


def _measure(method: str, T: int, repeats: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", method, str(T), str(repeats)],
        capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"},
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _naive_fits(T: int, L_H_d=(30, 9, 576)) -> bool:
    """The materialising algorithm holds ~3 float32 [T, T, H, d] tensors at once."""
    _, H, d = L_H_d
    need = 3 * T * T * H * d * 4
    avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return need < 0.6 * avail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-naive", action="store_true", help="skip the materialising algorithm")
    args = ap.parse_args()
    import torch

    print(f"# SmolLM2-135M (30 layers, 9 heads, d=576), CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"# best of {args.repeats} runs after a warm-up; peak extra = max RSS over a warmed-up forward pass, "
          "fresh process per cell")
    header = (f"{'T':>5} {'forward s':>10} {'flowray s':>10} {'naive s':>9} {'flowray/fwd':>12} "
              f"{'naive/fwd':>10} {'naive/flowray':>14} {'flowray MB':>11} {'naive MB':>9} {'output MB':>10}")
    print(header)
    for T in args.lengths:
        fwd = _measure("forward", T, args.repeats)
        flo = _measure("flowray", T, args.repeats)
        naive = (_measure("naive", T, args.repeats) if not args.no_naive and _naive_fits(T)
                 else {"error": "skipped: does not fit in memory" if not args.no_naive else "skipped"})
        out_mb = 30 * 9 * T * T * 4 / 2**20  # the [L, H, T, T] float32 result itself
        f, r = fwd.get("seconds"), flo.get("seconds")
        n = naive.get("seconds")

        def fmt(x, spec):
            return format(x, spec) if x is not None else "-"

        print(f"{T:>5} {fmt(f, '10.3f')} {fmt(r, '10.3f')} {fmt(n, '9.3f')} "
              f"{fmt(r / f if f and r else None, '12.2f')} {fmt(n / f if f and n else None, '10.2f')} "
              f"{fmt(n / r if n and r else None, '14.1f')} {fmt(flo.get('peak_extra_mb'), '11.0f')} "
              f"{fmt(naive.get('peak_extra_mb'), '9.0f')} {out_mb:>10.0f}", flush=True)
        for name, res in (("forward", fwd), ("flowray", flo), ("naive", naive)):
            if "error" in res and not res["error"].startswith("skipped"):
                print(f"#   {name} at T={T} failed: {res['error']}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        sys.exit(0)
    sys.exit(main())
