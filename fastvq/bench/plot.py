"""``--plot PATH``: median time vs K per provider, log-log, one panel per workload (matplotlib, PNG)."""
from __future__ import annotations

from collections import defaultdict

from .run import Result
from .workloads import WORKLOAD_TITLES, WORKLOADS

MARKERS = "os^vD<>xP*h"


def plot(results: list[Result], path: str, machine_line: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    workloads = [w for w in WORKLOADS if any(r.case.workload == w and r.timed for r in results)]
    if not workloads:
        raise ValueError("--plot needs at least one timed result, and this run has none")
    figure, axes = plt.subplots(1, len(workloads), figsize=(6.0 * len(workloads), 4.8), squeeze=False)
    providers = sorted({r.provider for r in results if r.timed}, key=_provider_order)
    styles = {name: MARKERS[i % len(MARKERS)] for i, name in enumerate(providers)}
    colors = {name: f"C{i % 10}" for i, name in enumerate(providers)}
    for axis, workload in zip(axes[0], workloads):
        # One line per provider and (N, d): only points that differ in K alone are joined.
        series: dict[tuple[str, int, int], list[tuple[int, float]]] = defaultdict(list)
        for result in results:
            if result.case.workload == workload and result.timed:
                key = (result.provider, result.case.n, result.case.d)
                series[key].append((result.case.k, result.stats.median_ms))
        has_lines = any(len(points) > 1 for points in series.values())
        for key in sorted(series, key=lambda key: (_provider_order(key[0]), key[1:])):
            name, points = key[0], sorted(series[key])
            lone = has_lines and len(points) == 1  # another shape: lighter, so the K-scan lines read first
            axis.plot([p[0] for p in points], [p[1] for p in points], marker=styles[name], color=colors[name],
                      linestyle=":" if name == "sgemm" else "-", linewidth=1.4 if name.startswith("fastvq") else 0.9,
                      alpha=0.45 if lone else 1.0, markersize=4 if lone else 6)
        names = sorted({key[0] for key in series}, key=_provider_order)
        handles = [Line2D([], [], marker=styles[n], color=colors[n], linestyle=":" if n == "sgemm" else "-",
                          label=n) for n in names]
        axis.legend(handles=handles, fontsize=8)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("codebook size K")
        axis.set_ylabel("median time per run (ms)")
        axis.set_title(WORKLOAD_TITLES[workload], fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
    figure.suptitle(f"fastvq.bench: lines join shapes with the same N and d; lone points are other shapes "
                    f"(see the table)\n{machine_line}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _provider_order(name: str) -> tuple[int, str]:
    return (0 if name.startswith("fastvq") else 2 if name == "sgemm" else 1, name)
