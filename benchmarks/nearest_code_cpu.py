"""Time nearest_code (search + gather) on the CPU: fastvq vs faiss-cpu vs naive torch.

    python benchmarks/nearest_code_cpu.py [--repeats 5] [--shapes 32768x1024x64 ...] [--no-naive]
                                          [--isa avx2] [--stat min]

--isa avx2 runs every provider as on an AVX2-only machine (the CI machines): fastvq's AVX2
kernel, faiss's AVX2 code (faiss.SIMDConfig), OpenBLAS and MKL limited to AVX2 (through
OPENBLAS_CORETYPE / MKL_ENABLE_INSTRUCTIONS, set by re-executing this script). Without it,
each provider uses the best instructions of this CPU.

Each provider is checked for correctness first (the chosen code's exact float64 distance
must be within a small tolerance of the true minimum, on a sample of rows), then timed
as the median of several runs. GF/s counts 2*N*K*d flops (the distance GEMM alone).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from fastvq import _cpu
from fastvq.backends.cpu import CpuBackend

DEFAULT_SHAPES = ["32768x1024x64", "16384x16384x64", "8192x65536x32"]


def fastvq_provider(x, e):
    backend = CpuBackend()
    return lambda: backend.nearest_code(x, e, want_quantized=True)[0]


FAISS_SIMD = None  # "AVX2" under --isa avx2


def faiss_provider(x, e):
    import faiss  # only here: a baseline, not a dependency

    if FAISS_SIMD is not None and hasattr(faiss, "SIMDConfig"):
        faiss.SIMDConfig.set_level(getattr(faiss, f"SIMDLevel_{FAISS_SIMD}"))
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatL2(e.shape[1])
    index.add(e.numpy())
    xn = x.numpy()

    def run():
        _, ids = index.search(xn, 1)
        return torch.from_numpy(ids[:, 0])

    return run


def naive_provider(x, e):
    def run():
        idx = torch.cdist(x, e).argmin(1)
        e[idx]  # the gather, as fastvq returns quantized rows
        return idx

    return run


PROVIDERS = {"fastvq": fastvq_provider, "faiss": faiss_provider, "naive": naive_provider}


def check(name, idx, x, e, sample=512):
    rows = torch.linspace(0, x.shape[0] - 1, min(sample, x.shape[0])).long()
    xs, ids = x[rows].double(), idx[rows].long()
    dist = ((xs[:, None, :] - e.double()[None]) ** 2).sum(-1)
    best = dist.min(1).values
    chosen = dist.gather(1, ids[:, None])[:, 0]
    err = (chosen - best).max().item()
    tol = 1e-4 * (1 + best.max().item())
    if err > tol:
        raise SystemExit(f"{name}: chosen code is {err:.3g} farther than the nearest (tolerance {tol:.3g})")


def time_all(fns, repeats, stat):
    """Runs the providers in turn, `repeats` rounds, so a change in machine load hits all alike."""
    for fn in fns.values():
        fn()  # warm-up (page faults, thread pools)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    pick = statistics.median if stat == "median" else min
    return {name: pick(ts) for name, ts in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="NxKxd")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    parser.add_argument("--no-naive", action="store_true")
    parser.add_argument("--simd", default="auto", help="force a fastvq SIMD level: portable, avx2, avx512")
    parser.add_argument("--isa", choices=["best", "avx2"], default="best",
                        help="avx2: every provider limited to AVX2, as on the CI machines")
    parser.add_argument("--stat", choices=["median", "min"], default="median",
                        help="min is steadier on a machine shared with other jobs")
    args = parser.parse_args()
    providers = [p for p in args.providers if not (args.no_naive and p == "naive")]
    if args.isa == "avx2":
        blas_env = {"OPENBLAS_CORETYPE": "Haswell", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
        if any(os.environ.get(k) != v for k, v in blas_env.items()):  # BLAS reads these at load time
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **blas_env})
        global FAISS_SIMD
        FAISS_SIMD = "AVX2"
        args.simd = "avx2"
    _cpu.set_simd_level(args.simd)

    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"{platform.machine()}  {os.cpu_count()} cpus  load avg {load}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}  fastvq simd {_cpu.simd_level()}  openmp {_cpu.openmp_enabled()}  "
          f"{args.stat} of {args.repeats}  isa {args.isa}")
    header = f"{'N':>6} {'K':>6} {'d':>4} " + " ".join(f"{p + ' ms':>11} {p + ' GF/s':>11}" for p in providers)
    if "fastvq" in providers:
        header += "".join(f" {'vs ' + p:>9}" for p in providers if p != "fastvq")
    print(header)
    gen = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        n, k, d = (int(v) for v in shape.split("x"))
        x = torch.randn(n, d, generator=gen)
        e = torch.randn(k, d, generator=gen)
        fns = {}
        for name in providers:
            fns[name] = PROVIDERS[name](x, e)
            check(name, fns[name](), x, e)
        times = time_all(fns, args.repeats, args.stat)
        flops = 2.0 * n * k * d
        row = f"{n:>6} {k:>6} {d:>4} " + " ".join(
            f"{times[p] * 1e3:>11.2f} {flops / times[p] / 1e9:>11.1f}" for p in providers)
        if "fastvq" in providers:
            row += "".join(f" {times[p] / times['fastvq']:>8.2f}x" for p in providers if p != "fastvq")
        print(row, flush=True)


if __name__ == "__main__":
    main()
