"""Timing that treats every provider alike: warm-up, then rounds that alternate providers run by run.

Round r runs each provider once, in an order rotated by r, so drift on a shared
machine (frequency, other jobs) hits every provider alike. A provider whose warm-up
shows it is slow does fewer rounds (never fewer than ``min_repeats``): its last
rounds are simply skipped. Garbage collection is off inside each timed call.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class Stats:
    times_ms: list[float]

    @property
    def repeats(self) -> int:
        return len(self.times_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    @property
    def max_ms(self) -> float:
        return max(self.times_ms)

    @property
    def q1_ms(self) -> float:
        return quantile(self.times_ms, 0.25)

    @property
    def q3_ms(self) -> float:
        return quantile(self.times_ms, 0.75)

    def to_json(self) -> dict:
        return {"times_ms": self.times_ms, "repeats": self.repeats, "median_ms": self.median_ms,
                "q1_ms": self.q1_ms, "q3_ms": self.q3_ms, "min_ms": self.min_ms, "max_ms": self.max_ms}


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), for 0 <= q <= 1."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def time_once(fn: Callable[[], object]) -> float:
    """Seconds for one call, with the garbage collector off during it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


def plan_repeats(estimate_s: float, repeats: int, min_repeats: int, budget_s: float) -> int:
    """Rounds for a provider whose one run takes about ``estimate_s``: ``repeats``, cut to fit ``budget_s``."""
    if estimate_s <= 0 or math.isinf(budget_s):
        return repeats
    return max(min(min_repeats, repeats), min(repeats, int(budget_s / estimate_s)))


def time_alternating(
    runs: dict[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 1,
    min_repeats: int = 3,
    budget_s: float = math.inf,
    estimates_s: dict[str, float] | None = None,
    warm_if_under_s: float = math.inf,
    on_run: Callable[[str], None] | None = None,
) -> dict[str, Stats]:
    """Warm up each provider ``warmup`` times, then alternate them for up to ``repeats`` rounds.

    ``estimates_s`` are earlier single-run times (the checked run, itself a first
    warm-up); the warm-up's minimum refines them. A provider whose estimate is at
    least ``warm_if_under_s`` skips the extra warm-up: one-time costs are lost in a
    run that long. ``on_run(name)`` is called after every run (progress).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    estimates = dict(estimates_s or {})
    for name, fn in runs.items():
        for _ in range(warmup if estimates.get(name, 0.0) < warm_if_under_s else 0):
            seconds = time_once(fn)
            estimates[name] = min(estimates.get(name, seconds), seconds)
            if on_run:
                on_run(name)
    planned = {name: plan_repeats(estimates.get(name, 0.0), repeats, min_repeats, budget_s) for name in runs}
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_number in range(max(planned.values(), default=0)):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            if len(times[name]) < planned[name]:
                times[name].append(1e3 * time_once(runs[name]))
                if on_run:
                    on_run(name)
    return {name: Stats(values) for name, values in times.items()}
