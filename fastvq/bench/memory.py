"""Peak memory of one provider on one case, in a child process of its own (Linux /proc).

The child loads every provider's libraries (the same baseline for all), warms the provider up
(not slow ones), resets the high-water mark (/proc/self/clear_refs = 5), runs it once and reports
VmHWM (``peak_rss_mb``) and what the run added to VmRSS (``delta_mb``; on CUDA also ``gpu_delta_mb``).
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

TIMEOUT_S = 900


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) / 1024 for line in handle if line.startswith(field + ":"))


def measure_here(workload: str, name: str, case, seed: int, warmup: bool = True) -> dict:
    """In the child: the peak RSS of one run."""
    import torch

    from . import providers
    from .cases import make_data

    for module in ("faiss", "vector_quantize_pytorch"):
        try:
            __import__(module)
        except Exception:  # a missing package is the provider's absence, which the parent reports
            pass
    run = providers.find(workload, name).setup(case, make_data(case, seed))
    if warmup:  # one-time costs (thread pools, lazy imports, caches) are not a run's memory
        run()
    gc.collect()
    cuda = torch.device(case.device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before, gpu_before = _status_mb("VmRSS"), torch.cuda.memory_allocated() if cuda else 0
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    run()
    peak = _status_mb("VmHWM")
    report = {"peak_rss_mb": round(peak, 1), "before_mb": round(before, 1),
              "delta_mb": round(max(0.0, peak - before), 1)}
    if cuda:
        torch.cuda.synchronize()
        report["gpu_delta_mb"] = round((torch.cuda.max_memory_allocated() - gpu_before) / 2**20, 1)
    return report


def measure(workload: str, name: str, case, seed: int, threads: int, warmup: bool = True) -> dict:
    """In the parent: spawn the child and return its report, or {"error": ...}."""
    request = json.dumps({"workload": workload, "provider": name, "case": case.to_json(), "seed": seed,
                          "threads": threads, "warmup": warmup})
    # glibc: mmap every allocation >= 64 KiB and return freed memory at once, so a run's RSS counts
    # what it allocates, not what an earlier run left in malloc's free lists.
    env = {k: v for k, v in os.environ.items() if k != "FASTVQ_BACKEND"} | {
        "OMP_NUM_THREADS": str(threads), "MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": "0"}
    try:
        done = subprocess.run([sys.executable, "-m", "fastvq.bench.memory", request], capture_output=True,
                              text=True, timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {TIMEOUT_S} s"}
    if done.returncode != 0 or not done.stdout.strip():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"child exited with {done.returncode}: {last}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import torch

    from .cases import Case

    request = json.loads(sys.argv[1])
    torch.set_num_threads(request["threads"])
    case = Case(**{k: v for k, v in request["case"].items() if k in Case.__dataclass_fields__})
    print(json.dumps(measure_here(request["workload"], request["provider"], case, request["seed"], request["warmup"])))
