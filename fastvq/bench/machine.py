"""Which machine a number came from, and ``--isa avx2``: every provider capped at AVX2, as on an
AVX2-only CPU. fastvq, ATen, MKL and OpenBLAS read their caps from the environment when they load,
so the bench re-executes itself with them set; faiss is capped through ``faiss.SIMDConfig``."""
from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata

import torch

ISA_CHOICES, MARKER = ("best", "avx2"), "FASTVQ_BENCH_ISA"
AVX2_ENV = {"FASTVQ_CPU_SIMD": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "OPENBLAS_CORETYPE": "Haswell", MARKER: "avx2"}
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "amx_tile")
VERSIONS = ("torch", "numpy", "faiss-cpu", "vector-quantize-pytorch", "triton", "fastvq")


def reexec_if_needed(isa: str, argv: list[str]) -> None:
    """Replace this process by one with the caps of ``isa`` in its environment, once."""
    if isa == "avx2" and os.environ.get(MARKER) != "avx2":
        os.execve(sys.executable, [sys.executable, "-m", "fastvq.bench", *argv], {**os.environ, **AVX2_ENV})


def limit_faiss(faiss) -> None:
    if os.environ.get(MARKER) == "avx2" and hasattr(faiss, "SIMDConfig"):
        faiss.SIMDConfig.set_level(faiss.SIMDLevel_AVX2)


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def describe(device: str = "cpu") -> dict:
    try:  # pytest-benchmark's helpers: py-cpuinfo for the CPU model and flags, git for the commit
        from pytest_benchmark.plugin import pytest_benchmark_generate_machine_info
        from pytest_benchmark.utils import get_commit_info

        machine, commit = pytest_benchmark_generate_machine_info(), get_commit_info()
    except ImportError:  # pytest-benchmark is not installed: what the platform module knows
        machine, commit = {"node": platform.node(), "machine": platform.machine(), "cpu": {}}, {}
    import fastvq

    flags = set(machine["cpu"].get("flags", ()))
    machine.update({
        "cpu_model": machine["cpu"].get("brand_raw") or platform.processor() or platform.machine(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa": {flag: flag in flags for flag in ISA_FLAGS} if flags else {},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_limit": os.environ.get(MARKER, "best"),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None,
        "versions": {name: _version(name) for name in VERSIONS} | {"torch": torch.__version__},
        "fastvq_backends": fastvq.available_backends(),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    return {"machine": machine, "commit": commit}


def summary(machine: dict) -> str:
    """One line for the tables: CPU model, cores, AVX2/AVX-512, ISA cap, GPU, threads, versions, load."""
    isa = "/".join(flag.upper() for flag in ("avx2", "avx512f") if machine["isa"].get(flag))
    versions, limit = machine["versions"], machine["isa_limit"]
    return ", ".join([machine["cpu_model"], f"{machine['usable_cpus']} cpus", isa or machine["torch_cpu_capability"],
                      *([f"every provider limited to {limit.upper()}"] if limit != "best" else []),
                      *([machine["gpu"]] if machine["gpu"] else []), f"{machine['torch_threads']} threads",
                      f"torch {versions['torch']}", f"faiss {versions['faiss-cpu'] or 'absent'}",
                      f"fastvq {versions['fastvq']}",
                      *([f"load {machine['load_average'][0]:.2f}"] if machine["load_average"] else [])])
