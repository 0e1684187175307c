"""The machine a benchmark ran on: CPU model, cores, ISA flags, versions, threads, load."""
from __future__ import annotations

import os
import platform
from importlib import metadata

import torch

from .isa import current_isa

# Environment variables that change how the libraries thread.
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "KMP_BLOCKTIME",
              "KMP_AFFINITY", "OMP_PROC_BIND", "FASTVQ_BACKEND")
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "amx_tile")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (Linux); empty elsewhere."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _faiss_threads() -> int | None:
    try:
        import faiss
    except Exception:  # faiss is optional
        return None
    return faiss.omp_get_max_threads()


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def describe() -> dict:
    """Everything needed to tell two benchmark runs' machines apart."""
    cpuinfo = _cpuinfo()
    flags = set(cpuinfo.get("flags", "").split())
    from .. import __version__ as fastvq_version
    from ..dispatch import available_backends

    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cpus = os.cpu_count()
    return {
        "cpu_model": cpuinfo.get("model name") or platform.processor() or platform.machine(),
        "cpu_family_model_stepping": [cpuinfo.get(k) for k in ("cpu family", "model", "stepping")],
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus,
        "isa": {flag: flag in flags for flag in ISA_FLAGS} if flags else {},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_limit": current_isa(),
        "memory_gb": _memory_gb(),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": _faiss_threads(),
        "cuda_available": torch.cuda.is_available(),
        "load_average_start": load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "fastvq": fastvq_version,
            "torch": torch.__version__,
            "numpy": _version("numpy"),
            "faiss-cpu": _version("faiss-cpu"),
            "vector-quantize-pytorch": _version("vector-quantize-pytorch"),
        },
        "fastvq_backends": available_backends(),
        "fastvq_git": _git_revision(),
        "environment": {name: os.environ[name] for name in THREAD_ENV if name in os.environ},
    }


def _git_revision() -> str | None:
    """The commit of the fastvq checkout this runs from (with "+dirty" if modified), or None."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def summary(machine: dict) -> str:
    """One line for the table caption."""
    isa = [flag for flag in ("avx2", "avx512f") if machine["isa"].get(flag)]
    versions = machine["versions"]
    parts = [
        machine["cpu_model"],
        f"{machine['usable_cpus']} cpus",
        "/".join(isa).upper() or machine["torch_cpu_capability"],
        *([f"every provider limited to {machine['isa_limit'].upper()}"] if machine.get("isa_limit", "best") != "best" else []),
        f"{machine['torch_threads']} threads",
        f"torch {versions['torch']}",
        f"faiss {versions['faiss-cpu'] or 'absent'}",
        f"fastvq {versions['fastvq']}",
    ]
    if machine.get("load_average_start"):
        parts.append(f"load {machine['load_average_start'][0]:.2f}")
    return ", ".join(parts)


def busy_warning(machine: dict) -> str | None:
    """A warning when the load average shows other work competing for the CPUs during the run."""
    loads = [machine.get("load_average_start"), machine.get("load_average_end")]
    worst = max((load[0] for load in loads if load), default=None)
    cpus = machine.get("usable_cpus") or 1
    if worst is None or worst <= 0.5 * cpus + 0.5:
        return None
    return (f"load average reached {worst:.1f} on {cpus} cpus: other processes competed for the CPUs, "
            "so these timings are noisy; re-run on a quiet machine for numbers to publish")
