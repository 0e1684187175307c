"""The timings' derived figures (GFLOP/s, % sgemm, ratios; None where not finite, so JSON stays strict) and the
machine they came from, shown once as rich tables (terminal, or rich's MARKDOWN box for --markdown), JSON and a plot."""
import io
import math
import os
import platform
from collections import defaultdict
from datetime import datetime, timezone
from importlib import metadata

import torch
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text  # cells are plain text, never rich markup

import fastvq

from .cases import TITLES, WORKLOADS, YARDSTICKS

ISA_MARKER = "FASTVQ_BENCH_ISA"  # set by --isa avx2 (cli.py)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "amx_tile")
VERSIONS = ("torch", "numpy", "faiss-cpu", "scikit-learn", "vector-quantize-pytorch", "triton", "fastvq")
# The baselines of each workload's ratio columns ("×naive" = naive's time / this time).
BASELINES = {"nearest_code": ("naive", "addmm", "faiss-flat"), "nearest_codes": ("naive", "faiss-flat"),
             "train": ("vector-quantize-pytorch",),
             "kmeans": ("faiss-kmeans", "sklearn-kmeans"), "rvq_train": ("vector-quantize-pytorch",),
             "rvq_beam": ("vector-quantize-pytorch",)}
SHORT = {"faiss-flat": "faiss", "faiss-kmeans": "faiss", "sklearn-kmeans": "sklearn",
         "vector-quantize-pytorch": "VectorQuantize"}
STYLES = {"sgemm": "dim", "memory": "dim", "fastvq": "bold"}  # the table rows' style by provider role
# The extra column of a workload: (derived figure, format, header).
RATIO = {"train": ("memory_ratio", ".3f", "run mem/VQ"), "kmeans": ("inertia_ratio", ".4f", "inertia/faiss"),
         "rvq_train": ("memory_ratio", ".3f", "run mem/RVQ"), "rvq_beam": ("memory_ratio", ".3f", "run mem/RVQ")}


def _finite(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def fma_peak(threads: int) -> dict | None:
    """The machine's fp32 FMA peak on ``threads`` threads at the SIMD level fastvq's search runs now (the
    extension's yardstick, csrc/cpu/fma_peak.cpp): {"gflops", "isa", "threads"}, or None without the extension."""
    try:
        from fastvq import _cpu
    except ImportError:
        return None
    return {"gflops": _cpu.fma_peak("", threads, 0.5), "isa": _cpu.simd_level(), "threads": threads}


def derive(results: list, peak_gflops: float | None = None) -> None:
    """Fill each timed result's ``derived``: gflops, pct_sgemm, pct_peak (CPU rows: against the FMA burst timed in
    the case's own rounds, ``Result.peak_gflops``, else ``peak_gflops``), pct_best_peak (against ``peak_gflops``,
    the run's best reading), and speedup/memory/inertia ratios per baseline."""
    groups = defaultdict(dict)
    for result in results:
        groups[result.case][result.provider] = result
    for case, group in groups.items():
        seconds, run_mb = defaultdict(lambda: math.nan), defaultdict(lambda: math.nan)  # NaN: no figure, ratio None
        seconds |= {n: r.timing["median_ms"] / 1e3 for n, r in group.items() if r.times_ms}
        # MB one run adds above the RSS before it (run.py), at least 1 (RSS resolution)
        run_mb |= {n: max(r.memory["delta_mb"], 1.0) for n, r in group.items() if "delta_mb" in r.memory}
        for result in (r for r in group.values() if r.times_ms):
            if result.role == "memory":  # a read, not products: its bandwidth only
                result.derived = {"gflops": None, "pct_sgemm": None, "pct_peak": None, "pct_best_peak": None,
                                  "read_gbps": _finite(case.int8_code_bytes / seconds[result.provider] / 1e9),
                                  "speedup": {}, "memory_ratio": {}, "inertia_ratio": {}}
                continue
            gflops = (case.pass_flops if result.role == "sgemm" else case.flops) / seconds[result.provider] / 1e9
            derived = result.derived = {"gflops": _finite(gflops), "speedup": {}, "memory_ratio": {},
                                        "inertia_ratio": {}}
            derived["pct_sgemm"] = _finite(100 * gflops * seconds["sgemm"] * 1e9 / case.pass_flops)
            on_cpu = torch.device(case.device).type == "cpu"
            # %peak: against the FMA burst timed in this case's rounds; %best_peak: against the run's best reading
            paired = result.peak_gflops or peak_gflops
            derived["pct_peak"] = _finite(100 * gflops / paired) if on_cpu and paired else None
            derived["pct_best_peak"] = _finite(100 * gflops / peak_gflops) if on_cpu and peak_gflops else None
            for name in BASELINES[case.workload] if result.role != "sgemm" else ():
                derived["speedup"][name] = _finite(seconds[name] / seconds[result.provider])
                derived["memory_ratio"][name] = _finite(run_mb[result.provider] / run_mb[name])
                mine, theirs = result.check.get("inertia"), group[name].check.get("inertia") if name in group else None
                derived["inertia_ratio"][name] = _finite(mine / theirs) if mine is not None and theirs else None


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _note(result) -> str:
    check, mem = result.check, result.memory
    if result.status != "ok":
        return f"{result.status.upper()}: {result.reason}"
    if "recall_at_1" in check:
        return f"recall@1 {check['recall_at_1']:.3f} ({check['rows']} rows, nprobe {check['nprobe']}/{check['nlist']})"
    if "error" in mem:
        return f"memory: {mem['error']}"
    if "gpu_delta_mb" in mem:  # against O(N + K·d): a fused search's own memory is a few floats per row and code
        case = result.case
        per_element = mem["gpu_delta_mb"] * 2**20 / (4 * (case.n + case.k * case.d))
        return f"GPU +{mem['gpu_delta_mb']:.0f} MB = {per_element:.1f}×4 B·(N + K·d)"
    if result.role == "memory" and result.derived.get("read_gbps"):
        return f"yardstick ({result.case.int8_code_bytes / 2**20:.1f} MiB read, {result.derived['read_gbps']:.1f} GB/s)"
    return "yardstick (N×K product)" if result.role == "sgemm" else ""


def table_rows(results: list, workload: str) -> tuple[list[str], list[tuple[list[str], str]]]:
    """The headers, and (cells, style) for every ok, wrong or error result (absent ones go to the caption)."""
    ratio, bases = RATIO.get(workload), BASELINES[workload]
    headers = ["case", "N×K×d", "provider", "ms", "IQR", "GFLOP/s", "%sgemm", "%peak",
               *(f"×{SHORT.get(b, b)}" for b in bases),
               "peak MB", "+run MB", *([ratio[2]] if ratio else []), "note"]
    rows = []
    for result in (r for r in results if r.case.workload == workload and r.status != "absent"):
        timing, derived, case = result.timing, result.derived, result.case
        cells = ["" if case.label == case.shape else case.label, case.shape, result.provider]
        cells += [_fmt(timing["median_ms"], ".1f"), f"{timing['q1_ms']:.1f}–{timing['q3_ms']:.1f}",
                  _fmt(derived["gflops"], ".1f"), _fmt(derived["pct_sgemm"], ".0f"),
                  _fmt(derived.get("pct_peak"), ".0f")] if timing else ["—"] * 5
        cells += ["1" if name == result.provider else _fmt(derived.get("speedup", {}).get(name), ".2f")
                  for name in bases]
        cells += [_fmt(result.memory.get("peak_rss_mb"), ".0f"), _fmt(result.memory.get("delta_mb"), ".0f")]
        cells += [_fmt(derived.get(ratio[0], {}).get(bases[0]), ratio[1])] if ratio else []
        style = "red" if result.status != "ok" else STYLES.get(result.role, "")
        rows.append((cells + [_note(result)], style))
    return headers, rows


def tables(results: list, machine_line: str, markdown: bool = False):
    """One rich Table per workload with results; with ``markdown``, GitHub markdown with fastvq's rows bold."""
    for workload in WORKLOADS:
        headers, rows = table_rows(results, workload)
        absent = dict.fromkeys(f"absent: {r.provider}: {r.reason}" for r in results if r.case.workload == workload
                               and r.status == "absent" and not r.reason.startswith("not applicable"))
        if not rows and not absent:
            continue
        table = Table(title=f"**{TITLES[workload]}**" if markdown else f"{TITLES[workload]} | {machine_line}",
                      caption="\n".join(absent) or None, title_justify="left", caption_justify="left",
                      box=box.MARKDOWN if markdown else box.HEAVY_HEAD)
        for i, header in enumerate(headers):
            last = i == len(headers) - 1
            table.add_column(header, justify="left" if i < 3 or last else "right", no_wrap=markdown or not last)
        for cells, style in rows:
            if markdown:
                cells = [f"**{c}**" if style == "bold" and c not in ("", "—") and i >= 2 else c.replace("|", "\\|")
                         for i, c in enumerate(cells)]
            table.add_row(*map(Text, cells), style=style or None)
        yield table


def render(results: list, machine_line: str) -> None:
    """Print the tables; when stdout is not a terminal (a log, CI), wide enough for every column."""
    console = Console(width=None if Console().is_terminal else 240)
    for table in tables(results, machine_line):
        console.print(table)


def markdown(results: list, machine_line: str, command: str) -> str:
    console = Console(file=io.StringIO(), width=100_000, color_system=None)
    console.print(f"Measured with `{command}` on {machine_line}.\n", markup=False, highlight=False)
    if any(r.peak_gflops for r in results):
        console.print("%peak: a row's median GFLOP/s over the median rate of an FMA burst timed in the same "
                      "alternating rounds (the peak the machine gave during that case; the best reading of the "
                      "run is in the line above, and each row's share of it is `pct_best_peak` in the JSON).\n",
                      markup=False, highlight=False)
    for table in tables(results, machine_line, markdown=True):
        console.print(table, "")
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()).strip() + "\n"


def plot(results: list, path: str, machine_line: str) -> None:
    """Median time vs K per provider, log-log, one panel per workload; lines join shapes with the same N, d, dtype."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    timed = [r for r in results if r.times_ms]
    workloads = [w for w in WORKLOADS if any(r.case.workload == w for r in timed)]
    panels = max(1, len(workloads))
    figure, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 4.8), squeeze=False, layout="tight")
    order = sorted({r.provider for r in timed}, key=lambda n: (n == "sgemm", not n.startswith("fastvq"), n))
    yardsticks = {r.provider for r in timed if r.role in YARDSTICKS}
    for axis, workload in zip(axes[0], workloads):
        series = defaultdict(list)
        for r in (r for r in timed if r.case.workload == workload):
            series[order.index(r.provider), r.case.n, r.case.d, r.case.dtype].append((r.case.k, r.timing["median_ms"]))
        for key in sorted(series):
            name, shown = order[key[0]], axis.get_legend_handles_labels()[1]
            axis.plot(*zip(*sorted(series[key])), marker="os^vD<>xP*h"[key[0] % 10], color=f"C{key[0] % 10}",
                      linestyle=":" if name in yardsticks else "-", label=None if name in shown else name)
        axis.set(xscale="log", yscale="log", xlabel="codebook size K", ylabel="median time per run (ms)")
        axis.set_title(TITLES[workload], fontsize=10)
        axis.legend(fontsize=8)
        axis.grid(True, which="both", alpha=0.3)
    figure.suptitle(f"fastvq.bench, {machine_line}", fontsize=9)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def describe(device: str = "cpu") -> dict:
    """pytest-benchmark's machine info (py-cpuinfo: CPU model, flags) and commit (git), and what a figure depends on."""
    from pytest_benchmark.plugin import pytest_benchmark_generate_machine_info
    from pytest_benchmark.utils import get_commit_info

    machine = pytest_benchmark_generate_machine_info()
    flags = set(machine["cpu"].get("flags", ()))
    installed = {(d.metadata["Name"] or "").lower().replace("_", "-"): d.version for d in metadata.distributions()}
    machine.update({
        "cpu_model": machine["cpu"].get("brand_raw") or platform.processor() or platform.machine(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa": {flag: flag in flags for flag in ISA_FLAGS} if flags else {},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_limit": os.environ.get(ISA_MARKER, "best"),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None,
        "versions": {name: installed.get(name) for name in VERSIONS} | {"torch": torch.__version__},
        "fastvq_backends": fastvq.available_backends(),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    return {"machine": machine, "commit": get_commit_info()}


def summary(machine: dict) -> str:
    """One line for the tables: CPU model, cores, AVX2/AVX-512, ISA cap, GPU, FMA peak, threads, versions, load."""
    isa = "/".join(flag.upper() for flag in ("avx2", "avx512f") if machine["isa"].get(flag))
    versions, limit, load = machine["versions"], machine["isa_limit"], machine["load_average"]
    peak = machine.get("fma_peak")
    return ", ".join(filter(None, [
        machine["cpu_model"], f"{machine['usable_cpus']} cpus", isa or machine["torch_cpu_capability"],
        limit != "best" and f"every provider limited to {limit.upper()}", machine["gpu"],
        peak and f"fp32 FMA peak {peak['gflops']:.0f} GFLOP/s ({peak['isa']}, {peak['threads']} threads)",
        f"{machine['torch_threads']} threads", f"torch {versions['torch']}",
        f"faiss {versions['faiss-cpu'] or 'absent'}", f"fastvq {versions['fastvq']}", load and f"load {load[0]:.2f}"]))
