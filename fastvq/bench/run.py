"""One case end to end: check every provider against the oracle, time the right ones alternately, measure memory."""
from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field

import torch

import fastvq

from . import memory
from .cases import Case, Data, make_data
from .judge import Wrong, check_gather, check_nearest, check_rows, inertia, oracle, recall
from .providers import COMMITMENT_WEIGHT, Absent, Provider
from .timing import summary, time_alternating

WARM_IF_UNDER_S = 1.0  # a provider whose checked run took longer gets no extra warm-up run


@dataclass
class Options:
    repeats: int = 5
    warmup: int = 1
    min_repeats: int = 3
    budget_s: float = 10.0  # per provider and case; slower providers do fewer rounds (>= min_repeats)
    memory: bool = True
    seed: int = 0
    threads: int = 1


@dataclass
class Result:
    case: Case
    provider: str
    role: str
    description: str
    status: str = "ok"  # ok: checked and timed | wrong: not timed | absent: cannot run here | error: raised
    reason: str = ""
    check: dict = field(default_factory=dict)
    times_ms: list = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    derived: dict = field(default_factory=dict)  # filled by report.derive

    @property
    def timing(self) -> dict:
        return summary(self.times_ms) if self.times_ms else {}

    def to_json(self) -> dict:
        return asdict(self) | {"workload": self.case.workload, "case": self.case.to_json(), "timing": self.timing}


def check_output(case: Case, data: Data, role: str, output, rows, best) -> dict:
    """What the check found (rows, recall, loss, inertia); raises Wrong when the output is wrong."""
    if role == "sgemm":
        return {}
    if case.workload == "kmeans":
        centroids = torch.as_tensor(output[0]).reshape(case.k, case.d).float()
        check_nearest(data.x, centroids, output[1], rows)
        return {"rows": len(rows), "inertia": inertia(data.x, centroids)}
    quantized, indices = output[:2]
    if role == "approximate":
        found, scored = recall(data.x, data.codebook, indices)
        return {"recall_at_1": found, "rows": scored}
    check_nearest(data.x, data.codebook, indices, rows, best)
    check_gather(quantized, data.codebook, indices, rows)
    if case.workload == "nearest_code":
        return {"rows": len(rows)}
    loss, x = float(output[2].detach()), output[3]
    expected = COMMITMENT_WEIGHT * float(((x.detach() - data.codebook[indices.reshape(-1)]).double() ** 2).mean())
    if abs(loss - expected) > 1e-4 * max(abs(expected), 1e-12):
        raise Wrong(f"loss {loss:.6g} != commitment_weight·mean((x − e_idx)²) = {expected:.6g}")
    if x.grad is None or not bool(torch.isfinite(x.grad).all()):
        raise Wrong("x.grad is missing or non-finite after backward")
    return {"rows": len(rows), "loss": loss}


def prepare(provider: Provider, case: Case, data: Data, rows, best, result: Result):
    """Set up and run the provider once, checked: (run, seconds), or None with the reason in ``result``."""
    try:
        run = provider.setup(case, data)
        start = time.perf_counter()
        output = run()
        if data.x.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        result.check = check_output(case, data, provider.role, output, rows, best) | getattr(run, "info", {})
        return run, seconds
    except (Absent, fastvq.BackendNotSupportedError) as why:
        result.status, result.reason = "absent", str(why)
    except Wrong as why:
        result.status, result.reason = "wrong", str(why)
    except Exception as error:  # reported in the table; the other providers still run
        result.status, result.reason = "error", f"{type(error).__name__}: {error}"[:300]
    return None


def run_case(case: Case, providers: list[Provider], options: Options, status=lambda message: None) -> list[Result]:
    data, rows = make_data(case, options.seed), check_rows(case.n, case.k, case.d)
    best = oracle(data.x, data.codebook, rows) if case.workload != "kmeans" else None
    results = {p.name: Result(case, p.name, p.role, p.description) for p in providers}
    runs, estimates = {}, {}
    for provider in providers:
        status(f"check {provider.name}")
        prepared = prepare(provider, case, data, rows, best, results[provider.name])
        if prepared:
            runs[provider.name], estimates[provider.name] = prepared
    try:
        times = time_alternating(runs, repeats=options.repeats, warmup=options.warmup, min_repeats=options.min_repeats,
                                 budget_s=options.budget_s, estimates_s=estimates, warm_if_under_s=WARM_IF_UNDER_S,
                                 device=case.device, on_run=lambda name: status(f"time {name}"))
    except Exception as error:  # one provider failing mid-run fails the case's timing, reported
        times = {}
        for name in runs:
            results[name].status, results[name].reason = "error", f"while timing: {type(error).__name__}: {error}"[:300]
    for name, values in times.items():
        results[name].times_ms = values
    del runs, data
    gc.collect()
    for result in results.values():
        if options.memory and result.status == "ok" and result.role != "sgemm":
            status(f"memory {result.provider}")
            result.memory = memory.measure(case.workload, result.provider, case, options.seed, options.threads,
                                           warmup=estimates[result.provider] < WARM_IF_UNDER_S)
    return list(results.values())
