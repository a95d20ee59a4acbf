"""The measurement run's phases: prompts in, then routes, patching, knockout and EAP timed side by side.

(a_b) routes: ``flowray.stats.prediction_stats_batch`` on padded batches of prompts, last position (the
      corpus job's path: ``flowray.baselines.batched``), with a plain forward pass of the same batch beside
      it to split the time; (a_b') the same for their ABC twins;
(a) and (a') the same routes one prompt at a time (``edge_importances`` + ``extract_route``): the secondary
    timing, and the edge-level routes the token-to-token agreement reads;
(b) per-head activation patching from the contrastive (ABC) twin, every head of every layer;
(c) attention knockout of every token pair ``j < i`` (all heads, all layers, no renormalisation);
(d) attribution patching (EAP): every head from two forward passes and one backward pass.

The methods take turns on chunks of prompts (sorted by token length, so that a batch pads little), so
that other processes slowing the machine for a while slow all methods alike instead of one phase. Shapes:
``P`` prompts, ``T`` tokens, ``L`` layers, ``H`` heads.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from flowray.api import edge_importances
from flowray.baselines.batched import SPLIT_PARTS, SplitClock, last_routes, plain_forward
from flowray.baselines.eap import eap_sweep
from flowray.baselines.forward import last_logits
from flowray.baselines.interventions import PatchingResult, patching_sweep
from flowray.baselines.knockout import attention_knockout, knockout_sweep
from flowray.routes import extract_route
from flowray.threads import spin_setting

PHASES = ("routes_batched", "routes_batched_contrastive", "forward_batched", "routes", "routes_contrastive",
          "patching", "knockout", "eap")
BASELINES = ("patching", "knockout", "eap")


# --- timing ---------------------------------------------------------------------------------------------
class Stopwatch:
    """Accumulates wall-clock and process CPU seconds (all threads) over ``with watch:`` blocks.

    CPU time is the steadier measure on a shared machine: other processes stretch the wall clock of whatever
    phase they overlap, but not (much) the work this process does.
    """

    def __init__(self):
        self.wall = 0.0
        self.cpu = 0.0

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu
        return False


# --- prompts ----------------------------------------------------------------------------------------------
@dataclass
class Item:
    """One usable prompt: its ABC twin has the same token length; answer and wrong are single tokens."""

    prompt: object  # flowray.tasks.TaskPrompt
    clean: object  # torch LongTensor [T]
    corrupt: object  # torch LongTensor [T]
    answer_id: int
    wrong_id: int


def continuation_id(tokenizer, text: str, piece: str) -> int | None:
    head = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer(text + piece, add_special_tokens=False)["input_ids"]
    if full[: len(head)] != head or len(full) != len(head) + 1:
        return None
    return int(full[-1])


def prepare(prompts, tokenizer) -> tuple[list[Item], list[str]]:
    """Tokenise prompts and twins; drop (and say why) those the baselines cannot use."""
    items, dropped = [], []
    for p in prompts:
        clean = tokenizer(p.text, return_tensors="pt").input_ids[0]
        corrupt = tokenizer(p.contrastive, return_tensors="pt").input_ids[0]
        a = p.meta.get("answer_token_id") if isinstance(p.meta, dict) else None
        w = p.meta.get("wrong_token_id") if isinstance(p.meta, dict) else None
        a = a if a is not None else continuation_id(tokenizer, p.text, p.answer)
        w = w if w is not None else continuation_id(tokenizer, p.text, p.wrong)
        if clean.shape != corrupt.shape:
            dropped.append(f"{p.text!r}: twin has {corrupt.shape[0]} tokens, prompt {clean.shape[0]}")
        elif a is None or w is None or a == w:
            dropped.append(f"{p.text!r}: answer {p.answer!r} / wrong {p.wrong!r} are not two single tokens")
        else:
            items.append(Item(p, clean, corrupt, int(a), int(w)))
    return items, dropped


def groups(keys) -> dict:
    """key -> list of indices, in first-seen order."""
    out: dict = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return out


# --- the interleaved measurement ------------------------------------------------------------------------
def route_of(lm, ids, tau: float):
    """``(route, T)``: the last-position route of one ``[T]`` prompt (edge_importances + extract_route)."""
    return extract_route(edge_importances(lm, ids[None]), tau=tau, position=-1), int(ids.shape[0])


def warm_up(lm, item, answer, wrong, tau: float) -> None:
    """One untimed pass of each kind, so no method pays for first-call setup (lazy imports, allocator)."""
    edge_importances(lm, item.clean[None])
    last_routes(lm, [item.clean, item.corrupt], tau)
    plain_forward(lm, [item.clean, item.corrupt])
    patching_sweep(lm.model, lm.adapter, item.clean[None], item.corrupt[None], answer, wrong, batch_size=8)
    eap_sweep(lm.model, lm.adapter, item.clean[None], item.corrupt[None], answer, wrong)
    with attention_knockout(lm.model, lm.adapter, [(0, 1, 0)]):
        last_logits(lm.model, item.clean[None])


@dataclass
class Measurement:
    """What the interleaved phases measured, per prompt in prompt order."""

    phases: dict  # phase name -> Stopwatch
    split: SplitClock  # the phases inside (a_b)'s calls
    clean_last: list  # LastRoute of each prompt (a_b)
    twin_last: list  # LastRoute of each ABC twin (a_b')
    clean_routes: list  # (route, T) of each prompt (a)
    twin_routes: list  # (route, T) of each ABC twin (a')
    knock: list  # (ld_clean, delta [T, T]) of each prompt's knockout sweep
    patch: PatchingResult
    eap: PatchingResult  # ld_patched: EAP's first-order estimate
    n_chunks: int  # prediction_stats_batch calls per side (prompts or twins)
    n_pairs: int  # knockout forward passes
    n_eap_calls: int  # EAP sweeps (each: two forward passes and one backward pass of a same-length batch)
    load_averages: list  # the 1-minute load average as each chunk began


def chunks_of(items: list[Item], route_batch: int) -> list[list[int]]:
    """Prompt indices sorted by token length, cut into near-equal chunks of at most ``route_batch``."""
    order = sorted(range(len(items)), key=lambda i: (int(items[i].clean.shape[0]), i))
    n = -(-len(order) // route_batch)
    bounds = np.linspace(0, len(order), n + 1).round().astype(int)
    return [order[a:b] for a, b in zip(bounds, bounds[1:])]


def measure(lm, items: list[Item], answer, wrong, *, tau: float, route_batch: int, batch_size: int,
            progress: bool) -> Measurement:
    """Run (a_b), (a_b'), (a), (a'), (b), (c) and (d) chunk by chunk, each under its own stopwatch."""
    hf, adapter = lm.model, lm.adapter
    P = len(items)

    def stack(idx, attr):
        return torch.stack([getattr(items[i], attr) for i in idx])

    phases = {name: Stopwatch() for name in PHASES}
    split = SplitClock()
    per_prompt = {k: [None] * P for k in ("clean_last", "twin_last", "clean_routes", "twin_routes", "knock")}
    results, eaps, order, n_pairs, n_eap = [], [], [], 0, 0
    chunks = chunks_of(items, route_batch)
    loads = []
    # the sweeps' bars sit below the chunk bar; outside a terminal they would print cursor-up codes
    inner = progress and sys.stderr.isatty()
    for c, chunk in enumerate(bar_chunks(chunks, progress)):
        loads.append(load_average())
        clean, twins = [items[i].clean for i in chunk], [items[i].corrupt for i in chunk]
        got = {}
        # (a_b) the corpus job's batched statistics, last position, then a plain forward pass of the same batch
        # to split its time; (a_b') the twins, for the contrastive difference. Which goes first alternates, so
        # that whatever the first call after the baselines pays falls on both alike.
        for side in (("clean", "twins") if c % 2 == 0 else ("twins", "clean")):
            if side == "clean":
                with phases["routes_batched"]:
                    got[side] = last_routes(lm, clean, tau, split)
                with phases["forward_batched"]:
                    plain_forward(lm, clean)
            else:
                with phases["routes_batched_contrastive"]:
                    got[side] = last_routes(lm, twins, tau)
        for k, i in enumerate(chunk):
            per_prompt["clean_last"][i], per_prompt["twin_last"][i] = got["clean"][k], got["twins"][k]
        for i in chunk:  # (a) and (a'): one prompt at a time, the way a user explores one prompt
            with phases["routes"]:
                per_prompt["clean_routes"][i] = route_of(lm, items[i].clean, tau)
            with phases["routes_contrastive"]:
                per_prompt["twin_routes"][i] = route_of(lm, items[i].corrupt, tau)
        for T, idx in groups(int(items[i].clean.shape[0]) for i in chunk).items():
            sub = [chunk[k] for k in idx]  # one token length: the baselines batch without padding
            with phases["patching"]:  # (b)
                results.append(patching_sweep(hf, adapter, stack(sub, "clean"), stack(sub, "corrupt"), answer[sub],
                                              wrong[sub], batch_size=batch_size, progress=inner))
            with phases["knockout"]:  # (c)
                res = knockout_sweep(hf, adapter, stack(sub, "clean"), answer[sub], wrong[sub],
                                     batch_size=batch_size, progress=inner)
            with phases["eap"]:  # (d)
                eaps.append(eap_sweep(hf, adapter, stack(sub, "clean"), stack(sub, "corrupt"), answer[sub], wrong[sub]))
            for row, i in enumerate(sub):
                per_prompt["knock"][i] = (res.ld_clean[row], res.delta[row])
            order += sub
            n_pairs += len(sub) * T * (T - 1) // 2
            n_eap += 1
    patch = reorder(PatchingResult.concatenate(results), order)
    eap = reorder(PatchingResult.concatenate(eaps), order)
    return Measurement(phases, split, **per_prompt, patch=patch, eap=eap, n_chunks=len(chunks), n_pairs=n_pairs,
                       n_eap_calls=n_eap, load_averages=loads)


def bar_chunks(chunks: list, progress: bool):
    bar = tqdm(total=sum(len(c) for c in chunks), desc="routes + patching + knockout + EAP", unit="prompt",
               disable=not progress)
    try:
        for chunk in chunks:
            yield chunk
            bar.update(len(chunk))
    finally:
        bar.close()


def reorder(res, order: list[int]):
    """Results concatenated in chunk order -> prompt order."""
    inv = np.argsort(np.asarray(order))
    return PatchingResult(res.ld_clean[inv], res.ld_corrupt[inv], res.ld_patched[inv])


def timing(m: Measurement, *, load_seconds: float, route_batch: int, same_heads: bool, n_heads_total: int) -> dict:
    """Seconds (wall and CPU) per phase, the per-prompt split of (a_b) and the baselines' ratios over routes.

    ``ratios[method]``: the method's seconds over (a_b)'s (batched routes of the prompts, the headline);
    ``ratios_both``: over (a_b) + (a_b') (prompts and twins: what the contrastive ranking needs);
    ``ratios_unbatched``: over (a) (one prompt at a time). ``*_cpu``: the same in process CPU seconds.
    """
    P = len(m.clean_last)
    out = {
        "load_model_s": load_seconds,
        "routes_batch": route_batch,
        "routes_batched_calls": m.n_chunks,
        "routes_batched_same_heads": same_heads,
        "patching_forward_passes": P * n_heads_total,
        "knockout_forward_passes": m.n_pairs,
        "eap_calls": m.n_eap_calls,
    }
    for name, watch in m.phases.items():
        out[f"{name}_s"], out[f"{name}_cpu_s"] = watch.wall, watch.cpu
    out["split_per_prompt_s"] = split_per_prompt(m, P)
    for kind, suffix in (("", "s"), ("_cpu", "cpu_s")):
        batched = out[f"routes_batched_{suffix}"]
        both = batched + out[f"routes_batched_contrastive_{suffix}"]
        single = out[f"routes_{suffix}"]
        for key, routes in (("ratios", batched), ("ratios_both", both), ("ratios_unbatched", single)):
            out[key + kind] = {method: out[f"{method}_{suffix}"] / routes for method in BASELINES}
    return out


def split_per_prompt(m: Measurement, P: int) -> dict:
    """(a_b)'s wall seconds per prompt: forward pass (a plain one of the same batch), importances (the rest
    of the forward pass under the capture), routes (the last positions', then the host copies) and Python
    setup (input checks, padding, per-sequence state); they sum to (a_b) per prompt."""
    w = m.split.wall
    forward = m.phases["forward_batched"].wall
    return {
        "total": m.phases["routes_batched"].wall / P,
        "forward": forward / P,
        "importances": (w["forward_and_importances"] - forward) / P,
        "routes": w["routes"] / P,
        "python_overhead": w["setup"] / P,
        "outside_split": (m.phases["routes_batched"].wall - sum(w[k] for k in SPLIT_PARTS)) / P,
    }


# --- the machine ------------------------------------------------------------------------------------------
def machine(model) -> dict:
    import transformers

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = next(model.parameters()).device
    return {
        "device": str(dev) if dev.type != "cuda" else f"cuda ({torch.cuda.get_device_name(dev)})",
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gomp_spincount": spin_setting(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def load_average() -> float | None:
    """The 1-minute load average (other processes competing for the cores), where the OS reports it."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None
