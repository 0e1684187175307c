"""Peak memory of one provider on one case, measured in a child process of its own.

The child builds the case's tensors and the provider's runner, runs it once to warm
up (skipped for providers slower than a second), records its RSS, resets the kernel's high-water mark (``/proc/self/clear_refs``
= 5, Linux), runs the provider once more, and reports VmHWM. So ``peak_rss_mb`` is the process's peak
resident memory during a run (interpreter, libraries and inputs included; every
child imports the libraries of all providers first, so the baselines match) and
``delta_mb`` is what the run added on top of what was resident before it: the
memory the run itself needs, which the ``mem/…`` ratios compare.

    python -m fastvq.bench.memory '{"workload": ..., "provider": ..., "case": {...}, "seed": 0, "threads": 2}'
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

from .workloads import Case

TIMEOUT_S = 900


def child_env(threads: int) -> dict[str, str]:
    """The parent's environment, with fastvq importable, the same thread count, and no backend override."""
    env = dict(os.environ)
    env.pop("FASTVQ_BACKEND", None)  # each fastvq-<backend> provider names its backend itself
    env["OMP_NUM_THREADS"] = str(threads)
    # glibc: serve every allocation >= 64 KiB by mmap and give freed memory back at once, so a
    # run's RSS counts what it allocates rather than what an earlier run left in malloc's free lists.
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    env["MALLOC_TRIM_THRESHOLD_"] = "0"
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _load_every_library() -> None:
    """Import every provider's libraries, so each child starts from the same resident baseline."""
    from ..dispatch import available_backends

    available_backends()  # imports each fastvq backend module
    for module in ("faiss", "vector_quantize_pytorch"):
        try:
            __import__(module)
        except Exception:  # a missing package is the provider's absence, reported elsewhere
            pass


def measure_here(workload: str, provider_name: str, case: Case, seed: int, warmup: bool = True) -> dict:
    """Run in the child: the peak RSS of one run of the provider."""
    from .providers import all_providers
    from .workloads import make_data

    provider = next(p for p in all_providers()[workload] if p.name == provider_name)
    data = make_data(case, seed)
    _load_every_library()
    reason = provider.absent_reason(case, data)  # also loads what the provider loads lazily
    if reason:
        raise RuntimeError(f"{provider_name} is absent in the child: {reason}")
    runner = provider.prepare(case, data)
    if warmup:  # one-time costs (thread pools, lazy imports, caches) are not a run's memory
        runner()
    gc.collect()
    before = _status_mb("VmRSS")
    reset = _reset_peak()
    runner()
    peak = _status_mb("VmHWM")
    if peak is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        import resource

        scale = 1.0 if sys.platform == "darwin" else 1024.0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
    return {
        "warmup": warmup,
        "peak_rss_mb": round(peak, 1),
        "before_mb": None if before is None else round(before, 1),
        "delta_mb": None if before is None else round(max(0.0, peak - before), 1),
        "method": "VmHWM after clear_refs reset" if reset else "peak RSS of the whole child (reset unavailable)",
    }


def measure(workload: str, provider_name: str, case: Case, seed: int, threads: int, warmup: bool = True) -> dict:
    """In the parent: spawn the child and return its report, or {"error": ...}.

    ``warmup=False`` skips the child's warm-up run (for slow providers, whose one-time
    costs are small beside a run)."""
    request = {"workload": workload, "provider": provider_name, "case": case.to_json(), "seed": seed,
               "threads": threads, "warmup": warmup}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fastvq.bench.memory", json.dumps(request)],
            capture_output=True, text=True, timeout=TIMEOUT_S, env=child_env(threads),
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {TIMEOUT_S} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"child exited with {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def _child_main(argv: list[str]) -> None:
    request = json.loads(argv[0])
    import torch

    torch.set_num_threads(int(request["threads"]))
    fields = {k: v for k, v in request["case"].items() if k in Case.__dataclass_fields__}
    report = measure_here(request["workload"], request["provider"], Case(**fields), int(request["seed"]),
                          bool(request.get("warmup", True)))
    print(json.dumps(report))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
