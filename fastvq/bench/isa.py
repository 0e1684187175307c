"""``--isa avx2``: run every provider as on an AVX2-only CPU.

fastvq's kernels, ATen, MKL and OpenBLAS read their instruction-set caps from the
environment when they load, so the bench re-executes itself with these variables set;
memory-measuring children inherit them. faiss 1.15 has one library with run-time
dispatch, capped through ``faiss.SIMDConfig`` in every process that builds an index.
"""
from __future__ import annotations

import os
import sys

ISA_CHOICES = ("best", "avx2")
MARKER = "FASTVQ_BENCH_ISA"
AVX2_ENV = {
    "FASTVQ_CPU_SIMD": "avx2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
    MARKER: "avx2",
}


def current_isa() -> str:
    return os.environ.get(MARKER, "best")


def reexec_if_needed(isa: str, argv: list[str]) -> None:
    """Replace this process by one with the caps of ``isa`` in its environment, once."""
    if isa == "best" or current_isa() == isa:
        return
    os.execve(sys.executable, [sys.executable, "-m", "fastvq.bench", *argv], {**os.environ, **AVX2_ENV})


def limit_faiss(faiss) -> None:
    if current_isa() == "avx2" and hasattr(faiss, "SIMDConfig"):
        faiss.SIMDConfig.set_level(faiss.SIMDLevel_AVX2)
