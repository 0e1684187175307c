"""Warm-up, then rounds that alternate providers run by run, each round's order rotated, so drift on a
shared machine hits every provider alike. Slow providers do fewer rounds (never under ``min_repeats``)."""
from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable

import torch


def time_once(fn: Callable[[], object], device: str = "cpu") -> float:
    """Seconds for one call, GC off: perf_counter on the CPU, CUDA events after a synchronize on a GPU."""
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        if not device.startswith("cuda"):
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    finally:
        if gc_was_on:
            gc.enable()


def plan_repeats(estimate_s: float, repeats: int, min_repeats: int, budget_s: float) -> int:
    """Rounds for a provider whose run takes about ``estimate_s``: ``repeats``, cut to fit ``budget_s``."""
    if estimate_s <= 0 or math.isinf(budget_s):
        return repeats
    return max(min(min_repeats, repeats), min(repeats, int(budget_s / estimate_s)))


def time_alternating(runs: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1, min_repeats: int = 1,
                     budget_s: float = math.inf, estimates_s: dict | None = None, warm_if_under_s: float = 1.0,
                     device: str = "cpu", on_run=lambda name: None) -> dict[str, list[float]]:
    """Milliseconds per run and provider. ``warmup`` runs each first, except for providers whose
    estimate is >= ``warm_if_under_s`` (one-time costs are lost in runs that long)."""
    estimates = dict(estimates_s or {})
    for name, fn in runs.items():
        for _ in range(warmup if estimates.get(name, 0.0) < warm_if_under_s else 0):
            estimates[name] = min(estimates.get(name, math.inf), time_once(fn, device))
            on_run(name)
    planned = {name: plan_repeats(estimates.get(name, 0.0), repeats, min_repeats, budget_s) for name in runs}
    names, times = list(runs), {name: [] for name in runs}
    for shift in (r % len(names) for r in range(max(planned.values(), default=0))):
        for name in names[shift:] + names[:shift]:
            if len(times[name]) < planned[name]:
                times[name].append(1e3 * time_once(runs[name], device))
                on_run(name)
    return times


def summary(times_ms: list[float]) -> dict:
    """Median and quartiles (linear interpolation, numpy's default) of one provider's runs."""
    q1, median, q3 = statistics.quantiles(times_ms, n=4, method="inclusive") if len(times_ms) > 1 else times_ms * 3
    return {"median_ms": median, "q1_ms": q1, "q3_ms": q3, "min_ms": min(times_ms), "repeats": len(times_ms)}
