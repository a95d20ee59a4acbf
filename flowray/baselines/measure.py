"""The measurement run's phases: prompts in, then routes, patching and knockout timed side by side.

(a) routes: ``edge_importances`` + ``extract_route`` (last position) for every prompt, one prompt at a time,
    and (a') for their ABC twins; (a_b) the prompts again through ``edge_importances_batch``;
(b) per-head activation patching from the contrastive (ABC) twin, every head of every layer;
(c) attention knockout of every token pair ``j < i`` (all heads, all layers, no renormalisation).

The methods take turns on chunks of prompts of one token length, so that other processes slowing the
machine for a while slow all methods alike instead of one phase. Shapes: ``P`` prompts, ``T`` tokens,
``L`` layers, ``H`` heads.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from flowray.api import edge_importances, edge_importances_batch
from flowray.baselines.forward import last_logits
from flowray.baselines.interventions import PatchingResult, patching_sweep
from flowray.baselines.knockout import attention_knockout, knockout_sweep
from flowray.routes import extract_route

PHASES = ("routes", "routes_contrastive", "routes_batched", "patching", "knockout")


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


def routes_batched(lm, ids_list, tau: float) -> list:
    """The same routes for several prompts from one ``edge_importances_batch`` call."""
    return [extract_route(imp, tau=tau, position=-1) for imp in edge_importances_batch(lm, [i[None] for i in ids_list])]


def warm_up(lm, item, answer, wrong) -> None:
    """One untimed pass of each kind, so no method pays for first-call setup (lazy imports, allocator)."""
    edge_importances(lm, item.clean[None])
    patching_sweep(lm.model, lm.adapter, item.clean[None], item.corrupt[None], answer, wrong, batch_size=8)
    with attention_knockout(lm.model, lm.adapter, [(0, 1, 0)]):
        last_logits(lm.model, item.clean[None])


@dataclass
class Measurement:
    """What the interleaved phases measured, per prompt in prompt order."""

    phases: dict  # phase name -> Stopwatch
    clean_routes: list  # (route, T) of each prompt
    twin_routes: list  # (route, T) of each ABC twin
    knock: list  # (ld_clean, delta [T, T]) of each prompt's knockout sweep
    patch: PatchingResult
    batched_freq: np.ndarray  # [L, H] activation frequency from the batched routes
    n_chunks: int  # edge_importances_batch calls
    n_pairs: int  # knockout forward passes


def measure(lm, items: list[Item], by_length: dict, answer, wrong, *, tau: float, route_batch: int,
            batch_size: int, progress: bool) -> Measurement:
    """Run (a), (a'), (a_b), (b) and (c) chunk by chunk, each under its own stopwatch."""
    hf, adapter = lm.model, lm.adapter
    s = adapter.shape
    P = len(items)

    def stack(idx, attr):
        return torch.stack([getattr(items[i], attr) for i in idx])

    phases = {name: Stopwatch() for name in PHASES}
    clean_routes, twin_routes, knock = [None] * P, [None] * P, [None] * P
    batched_freq = np.zeros((s.n_layers, s.n_heads))
    results, order, n_pairs = [], [], 0
    chunks = [(T, idx[c : c + route_batch]) for T, idx in by_length.items() for c in range(0, len(idx), route_batch)]
    for T, chunk in bar_chunks(chunks, progress):
        for i in chunk:  # (a) one prompt at a time, the way a user runs flowray
            with phases["routes"]:
                clean_routes[i] = route_of(lm, items[i].clean, tau)
        for i in chunk:  # (a') the twins, for the contrastive difference
            with phases["routes_contrastive"]:
                twin_routes[i] = route_of(lm, items[i].corrupt, tau)
        with phases["routes_batched"]:  # (a_b) the prompts again, batched like the baselines
            for route in routes_batched(lm, [items[i].clean for i in chunk], tau):
                for l, h in route.heads():
                    batched_freq[l, h] += 1 / P
        with phases["patching"]:  # (b)
            results.append(patching_sweep(hf, adapter, stack(chunk, "clean"), stack(chunk, "corrupt"),
                                          answer[chunk], wrong[chunk], batch_size=batch_size, progress=progress))
        order += chunk
        with phases["knockout"]:  # (c)
            res = knockout_sweep(hf, adapter, stack(chunk, "clean"), answer[chunk], wrong[chunk],
                                 batch_size=batch_size, progress=progress)
        for row, i in enumerate(chunk):
            knock[i] = (res.ld_clean[row], res.delta[row])
        n_pairs += len(chunk) * T * (T - 1) // 2
    patch = reorder(PatchingResult.concatenate(results), order)
    return Measurement(phases, clean_routes, twin_routes, knock, patch, batched_freq, len(chunks), n_pairs)


def bar_chunks(chunks: list, progress: bool):
    bar = tqdm(total=sum(len(c) for _, c in chunks), desc="routes + patching + knockout", unit="prompt",
               disable=not progress)
    try:
        for T, chunk in chunks:
            yield T, chunk
            bar.update(len(chunk))
    finally:
        bar.close()


def reorder(res, order: list[int]):
    """Results concatenated in group order -> prompt order."""
    inv = np.argsort(np.asarray(order))
    return PatchingResult(res.ld_clean[inv], res.ld_corrupt[inv], res.ld_patched[inv])


def timing(m: Measurement, *, load_seconds: float, route_batch: int, same_heads: bool, n_heads_total: int) -> dict:
    """Seconds (wall and CPU) per phase and the ratios of the baselines over the routes."""
    P = len(m.clean_routes)
    out = {
        "load_model_s": load_seconds,
        "routes_batch": route_batch,
        "routes_batched_calls": m.n_chunks,
        "routes_batched_same_heads": same_heads,
        "patching_forward_passes": P * n_heads_total,
        "knockout_forward_passes": m.n_pairs,
    }
    for name, watch in m.phases.items():
        out[f"{name}_s"], out[f"{name}_cpu_s"] = watch.wall, watch.cpu
    for suffix in ("s", "cpu_s"):
        kind = "" if suffix == "s" else "_cpu"
        routes, twins, batched = (out[f"{n}_{suffix}"] for n in ("routes", "routes_contrastive", "routes_batched"))
        for method in ("patching", "knockout"):
            spent = out[f"{method}_{suffix}"]
            out[f"ratio{kind}_{method}_over_routes"] = spent / routes
            out[f"ratio{kind}_{method}_over_routes_both"] = spent / (routes + twins)
            out[f"ratio{kind}_{method}_over_routes_batched"] = spent / batched
    return out


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
