"""One case end to end: build tensors, check every provider, time the correct ones alternately, measure memory."""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import Callable

from . import memory
from .providers import Provider
from .timing import Stats, time_alternating
from .verify import Oracle, check_rows
from .workloads import Case, make_data

# ok: checked and timed; wrong: disagrees with the oracle, not timed; absent: cannot run here
# (the reason says why); error: raised while preparing, checking or timing.
STATUSES = ("ok", "wrong", "absent", "error")


@dataclass
class Options:
    repeats: int = 5
    warmup: int = 1
    min_repeats: int = 3
    budget_s: float = 10.0  # per provider and case; slower providers do fewer rounds (>= min_repeats)
    warm_if_under_s: float = 1.0  # a provider whose checked run took longer gets no extra warm-up
    memory: bool = True
    seed: int = 0
    threads: int = 1


@dataclass
class Result:
    case: Case
    provider: str
    role: str
    description: str
    status: str
    reason: str = ""
    check: dict | None = None
    stats: Stats | None = None
    memory: dict | None = None
    derived: dict = field(default_factory=dict)  # filled by report.derive

    @property
    def timed(self) -> bool:
        return self.stats is not None and self.stats.repeats > 0

    def to_json(self) -> dict:
        return {
            "workload": self.case.workload, "case": self.case.to_json(), "provider": self.provider,
            "role": self.role, "description": self.description, "status": self.status, "reason": self.reason,
            "check": self.check, "timing": self.stats.to_json() if self.stats else None,
            "memory": self.memory, **self.derived,
        }


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 300 else text[:297] + "..."


def run_case(case: Case, providers: list[Provider], options: Options,
             status: Callable[[str], None] = lambda message: None) -> list[Result]:
    data = make_data(case, options.seed)
    rows = check_rows(case.n, case.k, case.d)
    oracle = Oracle()
    results: dict[str, Result] = {}
    runners, estimates = {}, {}
    for provider in providers:
        result = Result(case, provider.name, provider.role, provider.description, "ok")
        results[provider.name] = result
        try:
            reason = provider.absent_reason(case, data)
        except Exception as error:  # a provider's own probe failing is an absence, not a crash
            reason = f"availability check failed: {_short(error)}"
        if reason:
            result.status, result.reason = "absent", reason
            continue
        status(f"check {provider.name}")
        try:
            runner = provider.prepare(case, data)
            start = time.perf_counter()
            check = runner.checked_run(rows, oracle)
            estimates[provider.name] = time.perf_counter() - start
        except Exception as error:  # reported in the table; the other providers still run
            result.status, result.reason = "error", _short(error)
            continue
        if check.verdict is not None:
            result.check = check.verdict.to_json() | check.extra
        if not check.ok and provider.role != "approximate":
            verdict = check.verdict
            result.status = "wrong"
            result.reason = verdict.message or (
                f"{verdict.rows - verdict.passed} of {verdict.rows} checked rows are not a nearest code "
                f"(worst: {verdict.max_excess:.3g}× the float32 rounding slack above the minimum)")
            continue
        runners[provider.name] = runner
    del oracle
    gc.collect()

    if runners:
        done = {name: 0 for name in runners}

        def on_run(name: str) -> None:
            done[name] += 1
            status(f"time {name} ({done[name]})")

        try:
            timings = time_alternating(runners, repeats=options.repeats, warmup=options.warmup,
                                       min_repeats=options.min_repeats, budget_s=options.budget_s,
                                       estimates_s=estimates, warm_if_under_s=options.warm_if_under_s,
                                       on_run=on_run)
        except Exception as error:  # one provider failing mid-run fails the case's timing, reported
            for name in runners:
                results[name].status, results[name].reason = "error", f"while timing: {_short(error)}"
            timings = {}
        for name, stats in timings.items():
            results[name].stats = stats
    runners.clear()
    del data
    gc.collect()

    if options.memory:
        for result in results.values():
            if result.status == "ok" and result.role != "sgemm":
                status(f"memory {result.provider}")
                warm = estimates.get(result.provider, 0.0) < options.warm_if_under_s
                result.memory = memory.measure(case.workload, result.provider, case, options.seed,
                                               options.threads, warmup=warm)
    return list(results.values())


def median_ms(result: Result | None) -> float:
    return result.stats.median_ms if result is not None and result.timed else math.nan


def checked_runner(workload: str, provider_name: str, case: Case, seed: int = 0):
    """For the pytest-benchmark suites: ``(runner, "")`` checked and ready to time, or ``(None, why)``.

    ``why`` starts with "absent: " or "wrong: ".
    """
    from .providers import all_providers

    provider = next(p for p in all_providers()[workload] if p.name == provider_name)
    data = make_data(case, seed)
    reason = provider.absent_reason(case, data)
    if reason:
        return None, f"absent: {reason}"
    runner = provider.prepare(case, data)
    check = runner.checked_run(check_rows(case.n, case.k, case.d), Oracle())
    if not check.ok and provider.role != "approximate":
        verdict = check.verdict
        return None, f"wrong: {verdict.message or f'{verdict.rows - verdict.passed} of {verdict.rows} rows'}"
    return runner, ""
