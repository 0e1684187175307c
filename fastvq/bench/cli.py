"""``python -m fastvq.bench``: argument parsing and the run from cases to table, JSON and plot."""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from datetime import datetime, timezone

import torch

from . import machine as machine_info
from . import report
from .isa import ISA_CHOICES, reexec_if_needed
from .providers import provider_names, select_providers
from .run import Options, run_case
from .workloads import DEFAULT_CASES, QUICK_CASES, WORKLOADS, select_cases


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastvq.bench",
        description="Time fastvq against naive PyTorch, torch addmm, faiss-cpu and vector-quantize-pytorch "
                    "on the same tensors, after checking every provider against fastvq.reference.",
    )
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats, no memory (< 1 minute; CI)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--shapes", help="comma-separated sweep labels and/or NxKxd shapes (NxKxd-l2: unit rows), "
                                    "e.g. core-1,4096x1024x64")
    p.add_argument("--providers", help=f"comma-separated subset of: {', '.join(provider_names())} "
                                       "(sgemm is always timed; fastvq-torch, the oracle, only when named)")
    p.add_argument("--repeats", type=int, help="timed rounds per provider (default 5, --quick 3)")
    p.add_argument("--min-repeats", type=int, help="rounds never cut below this (default 3, --quick 2)")
    p.add_argument("--budget", type=float, help="seconds per provider and case; slower providers do fewer rounds, "
                                                "down to --min-repeats (default 10, --quick 1; 'inf' disables)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per provider after the checked run (default 1; none for a provider "
                                                                 "whose checked run took over 1 s)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"torch and faiss threads (default {torch.get_num_threads()})")
    p.add_argument("--kmeans-iters", type=int, help="k-means iterations (default 10, --quick 5)")
    p.add_argument("--memory", dest="memory", action="store_true", default=None,
                   help="measure peak RSS, one child process per provider and case (default: on; off with --quick)")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--isa", choices=ISA_CHOICES, default="best",
                   help="avx2: limit fastvq, faiss, MKL and OpenBLAS to AVX2, as on an AVX2-only CPU "
                        "(re-executes the bench with the caps in its environment; default: each uses its best)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write every figure and the machine description here")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: time vs K per provider, one panel per workload")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as GitHub markdown (for a README)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the sweeps' shapes and the providers, then exit")
    return p


def _workloads(spec: str) -> tuple[str, ...]:
    chosen = tuple(w.strip() for w in spec.split(",") if w.strip())
    if not chosen or any(w not in WORKLOADS for w in chosen):
        raise ValueError(f"--workloads must be a comma-separated subset of {','.join(WORKLOADS)}, got {spec!r}")
    return chosen


def _list() -> str:
    lines = ["default sweep:"] + [f"  {c.workload:<7} {c.label:<10} {c.shape}" for c in DEFAULT_CASES]
    lines += ["--quick sweep:"] + [f"  {c.workload:<7} {c.label:<10} {c.shape}" for c in QUICK_CASES]
    for workload, group in select_providers(",".join(provider_names())).items():
        lines.append(f"{workload} providers:")
        lines += [f"  {p.name:<14} {p.description}" + ("  [only when named]" if p.opt_in else "") for p in group]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    reexec_if_needed(args.isa, sys.argv[1:] if argv is None else argv)
    if args.list:
        print(_list())
        return 0
    for name in ("repeats", "min_repeats", "threads", "kmeans_iters"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    try:
        cases = select_cases(args.quick, args.shapes, _workloads(args.workloads), args.kmeans_iters or (5 if args.quick else None))
        providers = select_providers(args.providers)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if os.environ.pop("FASTVQ_BACKEND", None):
        print("note: FASTVQ_BACKEND is ignored here; each fastvq-<backend> provider names its backend",
              file=sys.stderr)
    torch.set_num_threads(args.threads)
    options = Options(
        repeats=args.repeats or (3 if args.quick else 5),
        warmup=args.warmup,
        min_repeats=args.min_repeats or (2 if args.quick else 3),
        budget_s=args.budget if args.budget is not None else (1.0 if args.quick else 10.0),
        memory=args.memory if args.memory is not None else not args.quick,
        seed=args.seed,
        threads=args.threads,
    )
    machine = machine_info.describe()
    machine_line = machine_info.summary(machine)
    started, clock = datetime.now(timezone.utc), time.perf_counter()

    results = []
    bar = _progress(len(cases), disable=args.no_progress)
    for case in cases:
        label = f"{case.workload} {case.label} {case.shape}"

        def status(message: str, label: str = label) -> None:
            bar.set_postfix_str(f"{label}: {message}", refresh=True)

        results += run_case(case, providers[case.workload], options, status)
        bar.update(1)
    bar.close()

    report.derive(results)
    machine["load_average_end"] = machine_info.load_average()
    report.render(results, machine_line)
    warning = machine_info.busy_warning(machine)
    if warning:
        print(f"warning: {warning}")
    meta = {
        "command": shlex.join(["python", "-m", "fastvq.bench", *(sys.argv[1:] if argv is None else argv)]),
        "started_utc": started.isoformat(timespec="seconds"),
        "elapsed_s": round(time.perf_counter() - clock, 1),
        "options": {**vars(options), "budget_s": None if math.isinf(options.budget_s) else options.budget_s},
    }
    if args.json:
        report.write_json(args.json, report.to_json(results, machine, meta))
        print(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(report.markdown(results, machine_line, meta["command"]))
        print(f"wrote {args.markdown}")
    if args.plot:
        try:
            from .plot import plot

            plot(results, args.plot, machine_line)
            print(f"wrote {args.plot}")
        except (ImportError, ValueError) as error:
            print(f"--plot: not written: {error}", file=sys.stderr)
    failed = [r for r in results if r.role == "fastvq" and r.status in ("wrong", "error")]
    for result in failed:
        print(f"FAILED: {result.case.workload} {result.case.label} {result.provider}: {result.reason}", file=sys.stderr)
    print(f"{meta['elapsed_s']} s, {meta['command']}")
    return 1 if failed else 0


class _Lines:
    """Progress for logs (stderr is not a terminal, or tqdm is missing): one line per finished case."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.done, self.quiet, self.last = total, 0, quiet, ""
        self.clock = time.perf_counter()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.last = text.split(":")[0]

    def update(self, count: int = 1) -> None:
        self.done += count
        if not self.quiet:
            print(f"[{self.done}/{self.total}] {self.last} done, {time.perf_counter() - self.clock:.0f} s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _progress(total: int, disable: bool):
    """A tqdm bar on a terminal, one line per case otherwise, nothing with --no-progress."""
    if disable or not sys.stderr.isatty():
        return _Lines(total, quiet=disable)
    try:
        from tqdm import tqdm
    except ImportError:
        return _Lines(total, quiet=False)
    return tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True)
