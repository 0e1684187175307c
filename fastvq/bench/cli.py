"""Time fastvq against naive PyTorch, torch addmm, faiss-cpu and vector-quantize-pytorch on the same tensors,
alternating run by run, after checking every provider against fastvq.reference."""
import argparse
import dataclasses
import json
import os
import shlex
import sys
import time

import torch
from tqdm import tqdm

from . import providers, report
from .cases import CUDA_CASES, DEFAULT_CASES, QUICK_CASES, WORKLOADS, select_cases
from .device_check import check_device
from .run import QUICK, Options, run_case

# --isa avx2: every provider capped at AVX2, as on an AVX2-only CPU. fastvq, ATen, MKL, OpenBLAS and faiss
# read their caps from the environment when they load, so the bench re-executes itself with them set.
AVX2_ENV = {"FASTVQ_CPU_SIMD": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "OPENBLAS_CORETYPE": "Haswell", "FAISS_SIMD_LEVEL": "AVX2", "FAISS_OPT_LEVEL": "AVX2",
            report.ISA_MARKER: "avx2"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastvq.bench", description=__doc__)
    add = p.add_argument
    add("--quick", action="store_true", help="small shapes, 3 repeats, no memory (< 1 minute; CI)")
    add("--device", default="cpu",
        help="cpu (default) or cuda[:i]; on CUDA runs are timed with CUDA events after an L2 flush")
    add("--check", action="store_true", help="first check the fastvq backends of --device on edge shapes (fp32, bf16)")
    add("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    add("--shapes", help="sweep labels and/or NxKxd shapes (-l2: unit rows, -bf16), e.g. core-1,4096x1024x64")
    add("--providers", help="provider names (see --list); sgemm is always timed, fastvq-torch only when named")
    add("--repeats", type=int, help="timed rounds per provider (default 5, --quick 3)")
    add("--min-repeats", type=int, help="rounds a slow provider is never cut below (default 3, --quick 2)")
    add("--fast-repeats", type=int, help="rounds of every provider in a case whose runs all take under 25 ms, "
                                         "when more than --repeats (default 25, --quick 3)")
    add("--budget", type=float, dest="budget_s", metavar="SECONDS",
        help="per provider and case, before rounds are cut (default 10, --quick 1)")
    add("--warmup", type=int, default=1, help="untimed runs after the checked one (none when that took > 1 s)")
    add("--threads", type=int, default=torch.get_num_threads(), help="torch and faiss threads (default: torch's)")
    add("--kmeans-iters", type=int, help="k-means iterations (default 10, --quick 5)")
    add("--memory", action=argparse.BooleanOptionalAction, help="peak RSS per provider (default: on, off with --quick)")
    add("--isa", choices=("best", "avx2"), default="best", help="avx2: cap fastvq, faiss, MKL and OpenBLAS at AVX2")
    add("--seed", type=int, default=0)
    add("--json", metavar="PATH", help="write every figure and the machine description as JSON")
    add("--plot", metavar="PATH", help="write a PNG: time vs K per provider, one panel per workload")
    add("--markdown", metavar="PATH", help="write the tables as GitHub markdown (for the README)")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--list", action="store_true", help="list the sweeps' shapes and the providers, then exit")
    return p


def listing() -> str:
    lines = [f"{title}:\n" + "\n".join(f"  {c.workload:<12} {c.label:<10} {c.shape}" for c in sweep)
             for title, sweep in (("default sweep", DEFAULT_CASES), ("--device cuda adds", CUDA_CASES),
                                  ("--quick sweep", QUICK_CASES))]
    return "\n".join(lines + [f"{workload} providers:\n" + "\n".join(
        f"  {p.name:<24} {p.description}" + "  [only when named]" * p.opt_in for p in providers.REGISTRY.values()
        if p.workload == workload) for workload in WORKLOADS])


def configure(args) -> tuple[list, dict, Options, torch.device]:
    """Cases, providers per workload, options and device; SystemExit with a message when an argument is wrong."""
    for name in ("repeats", "fast_repeats", "min_repeats", "threads", "kmeans_iters"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    workloads = tuple(w.strip() for w in args.workloads.split(","))
    if set(workloads) - set(WORKLOADS):
        raise SystemExit(f"--workloads must be a subset of {','.join(WORKLOADS)}, got {args.workloads!r}")
    try:
        device = torch.device(args.device)
        cases = select_cases(args.quick, args.shapes, workloads, str(device), args.kmeans_iters)
        chosen = providers.select(args.providers)
    except (ValueError, RuntimeError) as error:
        raise SystemExit(f"--device/--shapes/--providers: {error}") from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {args.device}: only cpu and cuda are benchmarked")
    given = {k: v for k, v in vars(args).items() if k in Options.__dataclass_fields__ and v is not None}
    options = dataclasses.replace(QUICK if args.quick else Options(), **given | {"warmup": max(0, args.warmup)})
    return list(cases), chosen, options, device


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    if args.isa == "avx2" and os.environ.get(report.ISA_MARKER) != "avx2":  # once: the caps are read at load time
        os.execve(sys.executable, [sys.executable, "-m", "fastvq.bench", *argv], os.environ | AVX2_ENV)
    if args.list:
        print(listing())
        return 0
    cases, chosen, options, device = configure(args)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():  # a GPU job on no GPU: no failure
        print(f"--device {device}: no such CUDA device here (torch {torch.__version__} sees "
              f"{torch.cuda.device_count()}); nothing was run.")
        return 0
    if os.environ.pop("FASTVQ_BACKEND", None):
        print("note: FASTVQ_BACKEND is ignored here; each fastvq-<backend> provider names its backend", file=sys.stderr)
    torch.set_num_threads(args.threads)
    if args.check and check_device(device):
        return 1
    command, clock = shlex.join(["python", "-m", "fastvq.bench", *argv]), time.perf_counter()
    document = {"schema": "fastvq.bench/2", "command": command, "options": vars(options), **report.describe(device)}
    document["machine"]["fma_peak"] = peak = report.fma_peak(args.threads)  # the CPU rows' %peak
    results, line = [], report.summary(document["machine"])
    with tqdm(cases, unit="case", file=sys.stderr, disable=args.no_progress or None, dynamic_ncols=True) as bar:
        for case in bar:  # the bar shows on a terminal only (disable=None)
            bar.set_postfix_str(f"{case.workload} {case.label} {case.shape}", refresh=True)
            results += run_case(case, chosen[case.workload], options)
    report.derive(results, peak and peak["gflops"])
    report.render(results, line)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(document | {"elapsed_s": round(time.perf_counter() - clock, 1),
                                  "results": [r.to_json() for r in results]}, handle, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(report.markdown(results, line, command))
    if args.plot:
        report.plot(results, args.plot, line)
    for path in filter(None, (args.json, args.markdown, args.plot)):
        print(f"wrote {path}")
    failed = [r for r in results if r.role == "fastvq" and r.status in ("wrong", "error")]
    for result in failed:
        print(f"FAILED: {result.case.workload} {result.case.label} {result.provider}: {result.reason}", file=sys.stderr)
    print(f"{round(time.perf_counter() - clock, 1)} s, {command}")
    return 1 if failed else 0
