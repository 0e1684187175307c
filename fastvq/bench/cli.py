"""``python -m fastvq.bench``: arguments, then cases -> checked, alternated timings -> table, JSON, markdown, plot."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import torch

from . import machine, providers, report
from .cases import CUDA_CASES, DEFAULT_CASES, QUICK_CASES, WORKLOADS, select_cases
from .run import Options, run_case


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastvq.bench", description="Time fastvq against naive PyTorch, torch "
                                "addmm, faiss-cpu and vector-quantize-pytorch on the same tensors, alternating run by "
                                "run, after checking every provider against fastvq.reference.")
    add = p.add_argument
    add("--quick", action="store_true", help="small shapes, 3 repeats, no memory (< 1 minute; CI)")
    add("--device", default="cpu", help="cpu (default) or cuda[:i]; on CUDA runs are timed with CUDA events")
    add("--check", action="store_true", help="first check every fastvq backend of --device against the reference on "
                                             "edge shapes (fp32, bf16, small integers, non-contiguous)")
    add("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    add("--shapes", help="sweep labels and/or NxKxd shapes (-l2: unit rows, -bf16), e.g. core-1,4096x1024x64")
    add("--providers", help="provider names (see --list); sgemm is always timed, fastvq-torch only when named")
    add("--repeats", type=int, help="timed rounds per provider (default 5, --quick 3)")
    add("--min-repeats", type=int, help="rounds a slow provider is never cut below (default 3, --quick 2)")
    add("--budget", type=float, help="seconds per provider and case before rounds are cut (default 10, --quick 1)")
    add("--warmup", type=int, default=1, help="untimed runs after the checked one (none when that took > 1 s)")
    add("--threads", type=int, default=torch.get_num_threads(), help="torch and faiss threads (default: torch's)")
    add("--kmeans-iters", type=int, help="k-means iterations (default 10, --quick 5)")
    add("--memory", action=argparse.BooleanOptionalAction, help="peak RSS per provider (default: on, off with --quick)")
    add("--isa", choices=machine.ISA_CHOICES, default="best", help="avx2: cap fastvq, faiss, MKL and OpenBLAS at AVX2")
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
        f"  {p.name:<24} {p.description}" + "  [only when named]" * p.opt_in for p in group)
        for workload, group in providers.select(",".join(providers.names())).items()])


def configure(args) -> tuple[list, dict, Options]:
    """Cases, providers per workload and options; SystemExit with a message when an argument is wrong."""
    for name in ("repeats", "min_repeats", "threads", "kmeans_iters"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    workloads = tuple(w.strip() for w in args.workloads.split(",") if w.strip())
    if not workloads or set(workloads) - set(WORKLOADS):
        raise SystemExit(f"--workloads must be a comma-separated subset of {','.join(WORKLOADS)}, "
                         f"got {args.workloads!r}")
    try:
        device, quick = str(torch.device(args.device)), args.quick
        cases = select_cases(quick, args.shapes, workloads, device, args.kmeans_iters or (5 if quick else None))
        chosen = providers.select(args.providers)
    except (ValueError, RuntimeError) as error:
        raise SystemExit(f"--device/--shapes/--providers: {error}") from None
    return list(cases), chosen, Options(
        repeats=args.repeats or (3 if quick else 5), warmup=max(0, args.warmup), seed=args.seed, threads=args.threads,
        min_repeats=args.min_repeats or (2 if quick else 3), budget_s=args.budget or (1.0 if quick else 10.0),
        memory=args.memory if args.memory is not None else not quick)


def missing_device(device: str) -> str | None:
    kind = torch.device(device)
    if kind.type == "cuda" and (kind.index or 0) >= torch.cuda.device_count():
        return (f"--device {device}: no such CUDA device here (torch {torch.__version__} sees "
                f"{torch.cuda.device_count()}); nothing was run.")
    return None if kind.type in ("cpu", "cuda") else f"--device {device}: only cpu and cuda are benchmarked"


def run_all(cases: list, chosen: dict, options: Options, quiet: bool) -> list:
    from tqdm import tqdm

    results = []
    with tqdm(cases, unit="case", file=sys.stderr, disable=True if quiet else None, dynamic_ncols=True) as bar:
        for case in bar:  # the bar shows on a terminal only (disable=None)
            label = f"{case.workload} {case.label} {case.shape}"
            results += run_case(case, chosen[case.workload], options, lambda message, label=label:
                                bar.set_postfix_str(f"{label}: {message}", refresh=True))
    report.derive(results)
    return results


def write_outputs(results: list, args, document: dict) -> None:
    line = machine.summary(document["machine"])
    if args.json:
        report.write_json(args.json, document | {"results": [r.to_json() for r in results]})
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(report.markdown(results, line, document["command"]))
    if args.plot:
        report.plot(results, args.plot, line)
    for path in filter(None, (args.json, args.markdown, args.plot)):
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    machine.reexec_if_needed(args.isa, argv)
    if args.list:
        print(listing())
        return 0
    cases, chosen, options = configure(args)
    if missing_device(args.device):
        print(missing_device(args.device))
        return 0 if torch.device(args.device).type == "cuda" else 2
    if os.environ.pop("FASTVQ_BACKEND", None):
        print("note: FASTVQ_BACKEND is ignored here; each fastvq-<backend> provider names its backend", file=sys.stderr)
    torch.set_num_threads(args.threads)
    if args.check:
        from .check import check_device

        if check_device(torch.device(args.device)):
            return 1
    document, clock = {"schema": "fastvq.bench/2", "command": shlex.join(["python", "-m", "fastvq.bench", *argv]),
                       "options": vars(options), **machine.describe(args.device)}, time.perf_counter()
    results = run_all(cases, chosen, options, args.no_progress)
    report.render(results, machine.summary(document["machine"]))
    write_outputs(results, args, document | {"elapsed_s": round(time.perf_counter() - clock, 1)})
    failed = [r for r in results if r.role == "fastvq" and r.status in ("wrong", "error")]
    for result in failed:
        print(f"FAILED: {result.case.workload} {result.case.label} {result.provider}: {result.reason}", file=sys.stderr)
    print(f"{round(time.perf_counter() - clock, 1)} s, {document['command']}")
    return 1 if failed else 0
