"""What the timings give (GFLOP/s, % sgemm, ratios), shown once as rich tables (on the terminal, or in
rich's MARKDOWN box for --markdown), in JSON and as a plot. Performance targets are not judged here."""
from __future__ import annotations

import io
import json
import math
from collections import defaultdict

from .cases import TITLES, WORKLOADS

# The baselines of each workload's ratio columns ("×naive" = naive's time / this time).
BASELINES = {"nearest_code": ("naive", "addmm", "faiss-flat"), "train": ("vector-quantize-pytorch",),
             "kmeans": ("faiss-kmeans",)}
SHORT = {"faiss-flat": "faiss", "faiss-kmeans": "faiss", "vector-quantize-pytorch": "VectorQuantize"}
# The extra column of a workload: (derived figure, format, header).
RATIO = {"train": ("memory_ratio", ".3f", "run mem/VQ"), "kmeans": ("inertia_ratio", ".4f", "inertia/faiss")}


def _seconds(result) -> float:
    return result.timing["median_ms"] / 1e3 if result is not None and result.times_ms else math.nan


def _run_mb(result) -> float:
    """MB one run adds above the RSS before it (memory.py), at least 1 (RSS resolution); NaN if unmeasured."""
    value = result.memory.get("delta_mb") if result is not None else None
    return math.nan if value is None else max(value, 1.0)


def _finite(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def derive(results: list) -> None:
    """Fill each timed result's ``derived``: gflops, pct_sgemm, and speedup/memory/inertia ratios per baseline."""
    groups = defaultdict(dict)
    for result in results:
        groups[result.case][result.provider] = result
    for case, group in groups.items():
        sgemm_gflops = case.pass_flops / _seconds(group.get("sgemm")) / 1e9
        for result in (r for r in group.values() if r.times_ms):
            gflops = (case.pass_flops if result.role == "sgemm" else case.flops) / _seconds(result) / 1e9
            derived = result.derived = {"gflops": gflops, "pct_sgemm": _finite(100.0 * gflops / sgemm_gflops),
                                        "speedup": {}, "memory_ratio": {}, "inertia_ratio": {}}
            for name in BASELINES[case.workload] if result.role != "sgemm" else ():
                base = group.get(name)
                derived["speedup"][name] = _finite(_seconds(base) / _seconds(result))
                derived["memory_ratio"][name] = _finite(_run_mb(result) / _run_mb(base))
                mine, theirs = result.check.get("inertia"), base.check.get("inertia") if base else None
                derived["inertia_ratio"][name] = mine / theirs if mine is not None and theirs else None


def _fmt(value, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _note(result) -> str:
    check, mem = result.check, result.memory
    if result.status != "ok":
        return f"{result.status.upper()}: {result.reason}"
    if "recall_at_1" in check:
        probes = f", nprobe {check['nprobe']}/{check['nlist']}" if "nprobe" in check else ""
        return f"recall@1 {check['recall_at_1']:.3f} ({check['rows']} rows{probes})"
    if "error" in mem or "gpu_delta_mb" in mem:
        return f"memory: {mem['error']}" if "error" in mem else f"GPU +{mem['gpu_delta_mb']:.0f} MB"
    return "yardstick (N×K product)" if result.role == "sgemm" else ""


def table_rows(results: list, workload: str) -> tuple[list[str], list[tuple[list[str], str]]]:
    """The headers, and (cells, style) for every ok, wrong or error result (absent ones go to the caption)."""
    ratio = RATIO.get(workload)
    headers = (["case", "N×K×d", "provider", "ms", "IQR", "GFLOP/s", "%sgemm"]
               + [f"×{SHORT.get(b, b)}" for b in BASELINES[workload]]
               + ["peak MB", "+run MB"] + ([ratio[2]] if ratio else []) + ["note"])
    rows = []
    for result in (r for r in results if r.case.workload == workload and r.status != "absent"):
        timing, derived, case = result.timing, result.derived, result.case
        cells = ["" if case.label == case.shape else case.label, case.shape, result.provider]
        cells += [_fmt(timing["median_ms"], ".1f"), f"{timing['q1_ms']:.1f}–{timing['q3_ms']:.1f}",
                  _fmt(derived["gflops"], ".1f"), _fmt(derived["pct_sgemm"], ".0f")] if timing else ["—"] * 4
        cells += ["1" if name == result.provider else _fmt(derived.get("speedup", {}).get(name), ".2f")
                  for name in BASELINES[workload]]
        cells += [_fmt(result.memory.get("peak_rss_mb"), ".0f"), _fmt(result.memory.get("delta_mb"), ".0f")]
        if ratio:
            cells.append(_fmt(derived.get(ratio[0], {}).get(BASELINES[workload][0]), ratio[1]))
        style = "red" if result.status != "ok" else {"sgemm": "dim", "fastvq": "bold"}.get(result.role, "")
        rows.append((cells + [_note(result)], style))
    return headers, rows


def tables(results: list, machine_line: str, markdown: bool = False):
    """One rich Table per workload with results; with ``markdown``, GitHub markdown with fastvq's rows bold."""
    from rich import box
    from rich.table import Table
    from rich.text import Text  # cells are plain text, never rich markup

    for workload in WORKLOADS:
        headers, rows = table_rows(results, workload)
        absent = dict.fromkeys(f"absent: {r.provider}: {r.reason}" for r in results if r.case.workload == workload
                               and r.status == "absent" and not r.reason.startswith("not applicable"))
        if rows or absent:
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
    from rich.console import Console

    console = Console()
    console = console if console.is_terminal else Console(width=240)
    for table in tables(results, machine_line):
        console.print(table)


def markdown(results: list, machine_line: str, command: str) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=100_000, color_system=None)
    console.print(f"Measured with `{command}` on {machine_line}.\n", markup=False, highlight=False)
    for table in tables(results, machine_line, markdown=True):
        console.print(table, "")
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()).strip() + "\n"


def write_json(path: str, document: dict) -> None:
    def clean(value):  # NaN and ±inf become null, so the file is strict JSON
        if isinstance(value, (dict, list, tuple)):
            return {k: clean(v) for k, v in value.items()} if isinstance(value, dict) else [clean(v) for v in value]
        return None if isinstance(value, float) and not math.isfinite(value) else value

    with open(path, "w") as handle:
        json.dump(clean(document), handle, indent=1, allow_nan=False)


def plot(results: list, path: str, machine_line: str) -> None:
    """Median time vs K per provider, log-log, one panel per workload; lines join shapes with the same N, d, dtype."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    timed = [r for r in results if r.times_ms]
    workloads = [w for w in WORKLOADS if any(r.case.workload == w for r in timed)]
    panels = max(1, len(workloads))
    figure, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 4.8), squeeze=False)
    rank = {"fastvq": 0, "sgemm": 2}  # fastvq first, the baselines, the yardstick last
    order = sorted({r.provider for r in timed}, key=lambda n: (rank.get(n.split("-")[0], 1), n))
    for axis, workload in zip(axes[0], workloads):
        series = defaultdict(list)
        for r in (r for r in timed if r.case.workload == workload):
            key = (order.index(r.provider), r.case.n, r.case.d, r.case.dtype)
            series[key].append((r.case.k, r.timing["median_ms"]))
        for key in sorted(series):
            name, shown = order[key[0]], axis.get_legend_handles_labels()[1]
            axis.plot(*zip(*sorted(series[key])), marker="os^vD<>xP*h"[key[0] % 10], color=f"C{key[0] % 10}",
                      linestyle=":" if name == "sgemm" else "-", label=None if name in shown else name)
        axis.set(xscale="log", yscale="log", xlabel="codebook size K", ylabel="median time per run (ms)")
        axis.set_title(TITLES[workload], fontsize=10)
        axis.legend(fontsize=8)
        axis.grid(True, which="both", alpha=0.3)
    figure.suptitle(f"fastvq.bench, {machine_line}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
