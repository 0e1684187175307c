"""One case end to end: check every provider against the oracle; time the right ones in rounds that alternate
providers run by run, each round's order rotated, so drift on a shared machine hits every provider alike (slow ones
do fewer rounds, never under ``min_repeats``); then peak memory, in a child process per provider (Linux /proc): all
providers' libraries loaded (one baseline), a warm-up (not for slow ones), the high-water mark reset (clear_refs = 5),
one run: VmHWM (``peak_rss_mb``), what it added to VmRSS (``delta_mb``; on CUDA also ``gpu_delta_mb``).

A CPU case also times a burst of FMA chains (``_cpu.fma_burst``, the yardstick of ``_cpu.fma_peak``) in the same
rounds, as one more run: its median rate is the peak the machine gave during that case (``Result.peak_gflops``).
On a shared machine the available peak drifts from minute to minute, so a row's %peak compares two medians taken
under the same load rather than a median against one best-of reading taken at the start."""
import contextlib
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

import fastvq

from .cases import YARDSTICKS, Case, Data, make_data
from .judge import Wrong, check_output, check_rows, judge_precision
from .providers import REGISTRY, Absent, Provider

WARM_IF_UNDER_S = 1.0  # a provider whose checked run took longer gets no warm-up: one-time costs are lost in it
# A case whose every run (the FMA burst's included) takes under this gets Options.fast_repeats rounds of each:
# five samples of a sub-millisecond call on a shared machine put its median anywhere in a +-15 % band (the
# streaming rows), and 25 rounds cost ~1 s. All runs alike, so that every round has every provider in it: a
# call is slower after some of the others (after torch.cdist's temporaries, or an FMA burst, by up to 1.9x at
# N = 1 here), and a provider left out of the later rounds would be timed in other company.
FAST_CASE_S = 0.025
PEAK_PROBE = "fma-peak probe"  # the FMA burst's name among a CPU case's runs (never a provider's name)
PROBE_S = 0.02  # about how long one burst runs
_probes: dict[tuple[str, int], tuple[int, float]] = {}  # (SIMD level, threads) -> (rounds, flops) of a burst


@dataclass
class Options:
    repeats: int = 5
    fast_repeats: int = 25  # rounds of each run of a case whose runs all take under FAST_CASE_S (if more)
    warmup: int = 1
    min_repeats: int = 3
    budget_s: float = 10.0  # per provider and case; slower providers do fewer rounds (>= min_repeats)
    memory: bool = True
    seed: int = 0


QUICK = Options(repeats=3, fast_repeats=3, min_repeats=2, budget_s=1.0, memory=False)  # --quick's defaults


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
    peak_gflops: float | None = None  # CPU cases: the FMA burst's median rate in this case's rounds

    @property
    def timing(self) -> dict:
        """Median and quartiles (linear interpolation, numpy's default) of the runs."""
        if not (times := self.times_ms):
            return {}
        q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
        return {"median_ms": median, "q1_ms": q1, "q3_ms": q3, "min_ms": min(times), "repeats": len(times)}

    def to_json(self) -> dict:
        case = asdict(self.case) | {"shape": self.case.shape, "flops": self.case.flops}
        return asdict(self) | {"workload": self.case.workload, "case": case, "timing": self.timing}


_L2_FLUSH: dict[torch.device, torch.Tensor] = {}


def flush_l2(device: torch.device) -> None:
    """Overwrite twice the GPU's L2 cache, so a timed run reads its inputs from HBM as a real one would, not from
    the cache the previous run left warm (the buffer is the bench's, allocated once per device)."""
    if device not in _L2_FLUSH:
        size = max(2 * torch.cuda.get_device_properties(device).L2_cache_size, 1 << 20)
        _L2_FLUSH[device] = torch.empty(size // 4, dtype=torch.int32, device=device)
    _L2_FLUSH[device].zero_()


def time_once(fn: Callable[[], object], device: str = "cpu") -> float:
    """Seconds for one call: perf_counter on the CPU; on a GPU, CUDA events around the call after an L2 flush
    and a synchronize, so neither the flush nor earlier work is timed."""
    if not device.startswith("cuda"):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    flush_l2(torch.device(device))
    torch.cuda.synchronize()
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


def time_alternating(runs: dict[str, Callable[[], object]], options: Options, estimates_s: dict | None = None,
                     device: str = "cpu") -> dict[str, list[float]]:
    """Milliseconds per run and provider: ``options.warmup`` runs of each provider estimated under WARM_IF_UNDER_S,
    then rounds; a provider's ``repeats`` are cut by its estimate to fit ``budget_s``, never under ``min_repeats``;
    all are raised to ``fast_repeats`` when every run is estimated under FAST_CASE_S."""
    estimates, names, times = dict(estimates_s or {}), list(runs), {name: [] for name in runs}
    gc.collect()
    gc.disable()  # no collection pause inside a timed run; the runs' garbage waits until the last round
    try:
        for name, fn in runs.items():
            for _ in range(options.warmup if estimates.get(name, 0.0) < WARM_IF_UNDER_S else 0):
                estimates[name] = min(estimates.get(name, math.inf), time_once(fn, device))
        fit = {name: int(min(options.repeats, options.budget_s / max(estimates.get(name, 0.0), 1e-9))) for name in runs}
        planned = {name: max(min(options.min_repeats, options.repeats), rounds) for name, rounds in fit.items()}
        if all(estimates.get(name, 0.0) < FAST_CASE_S for name in runs):
            planned = {name: max(rounds, options.fast_repeats) for name, rounds in planned.items()}
        for shift in (r % len(names) for r in range(max(planned.values(), default=0))):
            for name in names[shift:] + names[:shift]:
                if len(times[name]) < planned[name]:
                    times[name].append(1e3 * time_once(runs[name], device))
    finally:
        gc.enable()
    return times


def peak_probe(threads: int) -> tuple[Callable[[], float], float] | None:
    """A burst of FMA chains on ``threads`` threads at the search's SIMD level lasting about PROBE_S: (run, flops),
    or None without the extension."""
    try:
        from fastvq import _cpu
    except ImportError:
        return None
    key = (_cpu.simd_level(), threads)
    if key not in _probes:
        rounds, flops = 1 << 12, []
        while (seconds := time_once(lambda: flops.append(_cpu.fma_burst("", threads, rounds)))) < PROBE_S / 8:
            rounds *= 4
        scaled = max(1, int(rounds * PROBE_S / seconds))
        _probes[key] = scaled, flops[-1] / rounds * scaled
    rounds, flops = _probes[key]
    return (lambda: _cpu.fma_burst("", threads, rounds)), flops


def prepare(provider: Provider, case: Case, data: Data, rows, best, result: Result):
    """Set up and run the provider once, checked: (run, seconds), or None with the reason in ``result``."""
    try:
        run, output = provider.setup(case, data), []
        seconds = time_once(lambda: output.append(run()), case.device)
        result.check = check_output(case, data, provider.role, output[0], rows, best,
                                    judge_precision(provider.name, data))
        return run, seconds
    except (Absent, fastvq.BackendNotSupportedError) as why:
        result.status, result.reason = "absent", str(why)
    except Wrong as why:
        result.status, result.reason = "wrong", str(why)
    except Exception as error:  # reported in the table; the other providers still run
        result.status, result.reason = "error", f"{type(error).__name__}: {error}"[:300]
    return None


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) / 1024 for line in handle if line.startswith(field + ":"))


def measure_memory_here(name: str, case: dict, seed: int, warmup: bool) -> dict:
    """In the child: the peak RSS of one run."""
    for module in ("faiss", "vector_quantize_pytorch"):
        with contextlib.suppress(Exception):  # a missing package is the provider's absence, which the parent reports
            __import__(module)
    case = Case(**case)
    run = REGISTRY[case.workload, name].setup(case, make_data(case, seed))
    if warmup:  # one-time costs (thread pools, lazy imports, caches) are not a run's memory
        run()
    gc.collect()
    cuda = case.device.startswith("cuda")
    if cuda:  # the caching allocator counts on the host, as the kernels are queued: no synchronize needed
        torch.cuda.reset_peak_memory_stats()
    before, gpu_before = _status_mb("VmRSS"), torch.cuda.memory_allocated() if cuda else 0
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    run()
    peak = _status_mb("VmHWM")
    report = {"peak_rss_mb": round(peak, 1), "before_mb": round(before, 1), "delta_mb": round(max(0, peak - before), 1)}
    if cuda:
        report["gpu_delta_mb"] = round((torch.cuda.max_memory_allocated() - gpu_before) / 2**20, 1)
    return report


def measure_memory(name: str, case, seed: int, warmup: bool = True, timeout_s: float = 900) -> dict:
    """In the parent: the report of a child run with this process's torch threads, or {"error": ...}."""
    request = json.dumps({"name": name, "case": asdict(case), "seed": seed, "warmup": warmup})
    # glibc: mmap every allocation >= 64 KiB and return freed memory at once, so a run's RSS counts
    # what it allocates, not what an earlier run left in malloc's free lists.
    env = os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads()), "MALLOC_MMAP_THRESHOLD_": str(64 * 1024),
                        "MALLOC_TRIM_THRESHOLD_": "0"}
    try:
        done = subprocess.run([sys.executable, "-m", "fastvq.bench.run", request], capture_output=True,
                              text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s"}
    if done.returncode != 0 or not done.stdout.strip():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"child exited with {done.returncode}: {last}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_case(case: Case, providers: list[Provider], options: Options) -> list[Result]:
    data = make_data(case, options.seed)
    rows, best = check_rows(case, data)
    results = {p.name: Result(case, p.name, p.role, p.description) for p in providers}
    runs, estimates = {}, {}
    for provider in providers:
        if prepared := prepare(provider, case, data, rows, best, results[provider.name]):
            runs[provider.name], estimates[provider.name] = prepared
    probe = peak_probe(torch.get_num_threads()) if runs and torch.device(case.device).type == "cpu" else None
    with_probe = {PEAK_PROBE: probe[0]} if probe else {}
    try:
        times = time_alternating(runs | with_probe, options, estimates | {PEAK_PROBE: PROBE_S}, case.device)
        if probe:
            peak_gflops = probe[1] / statistics.median(times.pop(PEAK_PROBE)) / 1e6
            for result in results.values():
                result.peak_gflops = peak_gflops
        for name, values in times.items():
            results[name].times_ms = values
    except Exception as error:  # one provider failing mid-run fails the case's timing, reported
        for name in runs:
            results[name].status, results[name].reason = "error", f"while timing: {type(error).__name__}: {error}"[:300]
    del runs, data
    gc.collect()
    for result in results.values():
        if options.memory and result.status == "ok" and result.role not in YARDSTICKS:
            warm = estimates[result.provider] < WARM_IF_UNDER_S
            result.memory = measure_memory(result.provider, case, options.seed, warm)
    return list(results.values())


if __name__ == "__main__":  # the memory child
    print(json.dumps(measure_memory_here(**json.loads(sys.argv[1]))))
