"""Device operations and host waits of the job path per layer and per batch, counted on the CPU.

A GPU runs one or more kernels for every tensor operation that is not a view or an allocation, and the
host waits for the device wherever it reads a device value. Both can be counted without a GPU: this
script runs ``prediction_stats_batch`` (3 taus, word splits, every position's routes) on tiny random Llamas
that differ only in their number of layers, under a ``TorchDispatchMode`` that counts each aten operation
by the flowray source line that issued it, with Triton's launches counted apart (under
``TRITON_INTERPRET=1``, set here unless given; the interpreter's own tensor work is not counted). The host
reads of device values are counted where Python asks for them (``item``, ``tolist``, ``bool``/``int``/
``float`` of a tensor, a blocking copy to the host, and ``nonzero``, whose output size the host must wait
for). The difference between two depths, divided by the difference in layers, is the cost per layer;
what is left at zero layers is the cost per batch.

Counted this way, the forward pass's own operations (transformers' modules) are reported apart from
flowray's. A GPU can run more than one kernel for some operations (a sort, an indexed write), so the
counts are a floor on kernel launches, not the profile of a device (``bench/gpu_job.py`` counts those).

    python bench/launch_count.py                       # the Triton backend (interpreted), 2 and 6 layers
    python bench/launch_count.py --backend torch --top 12
    python bench/launch_count.py --json counts.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # flowray from this checkout, installed or not

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

TAUS = (0.01, 0.03, 0.04)
# aten operations that launch nothing on a GPU: views, allocations, metadata
NO_KERNEL = {"empty", "empty_strided", "empty_like", "view", "_unsafe_view", "as_strided", "expand", "permute",
             "transpose", "t", "slice", "select", "unsqueeze", "squeeze", "detach", "alias", "split",
             "split_with_sizes", "unbind", "narrow", "_reshape_alias", "lift_fresh", "view_as_real", "unfold",
             "diagonal", "resize_", "chunk", "set_",
             "_local_scalar_dense"}  # a host read: a copy and a wait, counted as the wait
WAIT_OPS = {"nonzero", "equal"}  # the host needs the output's size or value (item and the like: HOST_READS)
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
FLOWRAY = str(Path(__file__).resolve().parents[1] / "flowray")


def _where(skip: int) -> str:
    """The innermost flowray source line on the stack ("forward pass" inside transformers' modules)."""
    for frame in reversed(traceback.extract_stack()[:-skip]):
        if "/transformers/" in frame.filename:
            return "forward pass (transformers)"
        if frame.filename.startswith(FLOWRAY):
            rel = frame.filename[len(FLOWRAY) - len("flowray"):]
            return f"{rel}:{frame.lineno} {frame.name}"
    return "(caller)"


class Counter(TorchDispatchMode):
    """Counts, per source line, the aten operations that launch kernels and the host's waits."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.waits: collections.Counter = collections.Counter()
        self.launches: collections.Counter = collections.Counter()
        self.paused = 0
        self.forward_started = False  # until then host reads read the inputs, which a GPU run holds on the host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if self.paused or name in NO_KERNEL or func.namespace != "aten":
            return out
        where = _where(2)
        self.ops[where] += 1
        self.forward_started = self.forward_started or where.startswith("forward pass")
        if name in WAIT_OPS:
            self._wait(where)
        return out

    def host_read(self) -> None:
        if not self.paused:
            self._wait(_where(3))

    def _wait(self, where: str) -> None:
        self.waits[where if self.forward_started else f"(inputs) {where}"] += 1


class Hooks:
    """Python-level host reads and Triton launches, routed to the active ``Counter`` while installed."""

    def __init__(self):
        self.counter: Counter | None = None
        self.saved: list = []

    def __enter__(self):
        def reader(real):
            def read(t, *a, **k):
                if self.counter is not None:
                    self.counter.host_read()
                return real(t, *a, **k)
            return read

        def to(real):
            def move(t, *a, **k):
                target = a[0] if a else k.get("device")
                if (self.counter is not None and isinstance(target, (str, torch.device))
                        and torch.device(target).type == "cpu" and not k.get("non_blocking", False)):
                    self.counter.host_read()
                return real(t, *a, **k)
            return move

        for name in HOST_READS:
            self._patch(torch.Tensor, name, reader(getattr(torch.Tensor, name)))
        self._patch(torch.Tensor, "cpu", reader(torch.Tensor.cpu))
        self._patch(torch.Tensor, "to", to(torch.Tensor.to))
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError:
            return self
        real_run = InterpretedFunction.run

        def run(fn, *a, **k):
            counter = self.counter
            if counter is None:
                return real_run(fn, *a, **k)
            counter.launches[f"triton {getattr(fn.fn, '__name__', '?')} ({_where(2)})"] += 1
            counter.paused += 1  # the interpreter's own tensor work is no launch
            try:
                return real_run(fn, *a, **k)
            finally:
                counter.paused -= 1

        self._patch(InterpretedFunction, "run", run)
        return self

    def _patch(self, owner, name, value):
        self.saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def __exit__(self, *exc):
        for owner, name, value in reversed(self.saved):
            setattr(owner, name, value)


def _model(layers: int, heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=8 * heads, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=256, rms_norm_eps=1e-5)
    return LlamaForCausalLM(config).eval()


def _words(T: int):
    word_index = np.arange(T) // 2
    return word_index, word_index != np.r_[-1, word_index[:-1]]


def count(layers: int, heads: int, backend: str, lengths=(24, 19, 11)) -> dict:
    """One batch's counts (after a warm-up call) for a model of ``layers`` layers."""
    from flowray.stats import prediction_stats_batch

    model = _model(layers, heads)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 97, (1, T), generator=gen) for T in lengths]
    words = [_words(T) for T in lengths]

    def job():
        prediction_stats_batch(model, seqs, TAUS, words=words, backend=backend)

    job()
    with Hooks() as hooks, Counter() as counter:
        hooks.counter = counter
        job()
        hooks.counter = None
    return dict(ops=counter.ops, waits=counter.waits, launches=counter.launches)


def per_layer(low: dict, high: dict, d_layers: int) -> dict:
    """Per-layer and per-batch counts from two depths: (high - low) / d_layers, and low minus its layers."""
    out = {}
    for key in ("ops", "waits", "launches"):
        lines = set(low[key]) | set(high[key])
        out[key] = {w: (high[key].get(w, 0) - low[key].get(w, 0)) / d_layers for w in lines}
    return out


def _total(counts: dict, forward: bool | None) -> float:
    return sum(v for w, v in counts.items() if forward is None or w.startswith("forward pass") == forward)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="triton", choices=("triton", "torch", "cpu"))
    parser.add_argument("--layers", default="2,6", help="two depths, comma-separated (default 2,6)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--top", type=int, default=8, help="source lines listed by their operations per layer")
    parser.add_argument("--json", help="write the counts here")
    args = parser.parse_args(argv)
    try:
        low_l, high_l = (int(x) for x in args.layers.split(","))
        if not 1 <= low_l < high_l:
            raise ValueError
    except ValueError:
        parser.error(f"--layers takes two depths, smaller first, e.g. 2,6; got {args.layers!r}")
    if args.backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--backend triton counts on the CPU through Triton's interpreter: leave TRITON_INTERPRET "
                     "unset or set it to 1")
    low, high = count(low_l, args.heads, args.backend), count(high_l, args.heads, args.backend)
    layer = per_layer(low, high, high_l - low_l)
    batch = {k: {w: low[k].get(w, 0) - low_l * layer[k].get(w, 0) for w in layer[k]} for k in layer}
    result = dict(
        backend=args.backend, heads=args.heads, layers=[low_l, high_l],
        per_layer=dict(forward_ops=_total(layer["ops"], True), flowray_ops=_total(layer["ops"], False),
                       triton_launches=_total(layer["launches"], None), waits=_total(layer["waits"], None)),
        per_batch=dict(flowray_ops=_total(batch["ops"], False), triton_launches=_total(batch["launches"], None),
                       waits=sum(v for w, v in batch["waits"].items() if not w.startswith("(inputs)")),
                       input_reads=sum(v for w, v in batch["waits"].items() if w.startswith("(inputs)"))),
        lines_per_layer={w: v for w, v in sorted(layer["ops"].items(), key=lambda kv: -kv[1]) if v},
        waits_per_layer={w: v for w, v in layer["waits"].items() if v},
        waits_per_batch={w: v for w, v in sorted(batch["waits"].items(), key=lambda kv: -kv[1]) if v},
    )
    pl, pb = result["per_layer"], result["per_batch"]
    print(f"# job path, backend {args.backend}, {args.heads} heads, counted at {low_l} and {high_l} layers")
    print(f"per layer: forward pass {pl['forward_ops']:.0f} ops; flowray {pl['flowray_ops']:.0f} ops + "
          f"{pl['triton_launches']:.0f} Triton launches = {pl['flowray_ops'] + pl['triton_launches']:.0f}; "
          f"host waits {pl['waits']:.0f}")
    print(f"per batch (besides the layers): flowray {pb['flowray_ops']:.0f} ops + {pb['triton_launches']:.0f} "
          f"Triton launches; host waits {pb['waits']:.0f} (and {pb['input_reads']:.0f} reads of the inputs before "
          "the forward pass, on the host)")
    print("flowray's operations per layer by source line:")
    for w, v in [(w, v) for w, v in result["lines_per_layer"].items() if not w.startswith("forward")][:args.top]:
        print(f"  {v:6.1f}  {w}")
    for w, v in result["waits_per_layer"].items():
        print(f"  host waits per layer: {v:.1f} at {w}")
    print("host waits per batch by source line:")
    for w, v in [(w, v) for w, v in result["waits_per_batch"].items() if not w.startswith("(inputs)")][:args.top]:
        print(f"  {v:6.1f}  {w}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
