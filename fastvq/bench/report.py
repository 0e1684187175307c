"""Figures derived from the timings (GFLOP/s, % sgemm, ratios, targets), the tables, and the JSON file."""
from __future__ import annotations

import json
import math
from collections import defaultdict

from .run import Result
from .workloads import WORKLOAD_TITLES, WORKLOADS

# The baselines each workload's ratio columns compare against ("× naive" = naive's time / this time).
BASELINES = {"search": ("naive", "addmm", "faiss-flat"), "train": ("vqtorch",), "kmeans": ("faiss-kmeans",)}
SHORT = {"faiss-flat": "faiss", "faiss-kmeans": "faiss"}
# Targets are for fastvq's performance backends; fastvq-torch is the oracle, timed only on request.
NOT_TARGETED = ("fastvq-torch",)
SCHEMA = "fastvq.bench/1"

# (workload, metric, baseline, required, aim, "higher"|"lower"): checked for every fastvq-* row of
# the cases the issues set targets on (the "core-*" shapes); other shapes only report ratios.
TARGET_LABEL_PREFIX = "core-"
TARGETS = (
    ("search", "speedup", "faiss-flat", 1.5, 2.0, "higher"),
    ("search", "speedup", "naive", 4.0, 5.0, "higher"),
    ("train", "speedup", "vqtorch", 12.0, 15.0, "higher"),
    ("train", "memory", "vqtorch", 0.1, 0.1, "lower"),
    ("kmeans", "speedup", "faiss-kmeans", 1.2, 1.2, "higher"),
    ("kmeans", "inertia", "faiss-kmeans", 1.02, 1.02, "lower"),
)


def _median_s(result: Result | None) -> float:
    return result.stats.median_ms / 1e3 if result is not None and result.timed else math.nan


def _run_memory(result: Result | None) -> float:
    """MB a run adds above the RSS before it (see memory.py); NaN if not measured."""
    mem = result.memory if result is not None else None
    value = mem.get("delta_mb") if mem else None
    return math.nan if value is None else max(value, 1.0)  # 1 MB floor: below the resolution of RSS


def _finite(value: float) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def derive(results: list[Result]) -> None:
    """Fill each result's ``derived``: gflops, pct_sgemm, speedup/memory/inertia ratios per baseline."""
    by_case: dict[tuple, dict[str, Result]] = defaultdict(dict)
    for result in results:
        by_case[(result.case.workload, result.case)][result.provider] = result
    for (workload, case), group in by_case.items():
        sgemm_s = _median_s(group.get("sgemm"))
        sgemm_gflops = case.pass_flops / sgemm_s / 1e9 if sgemm_s > 0 else math.nan
        for result in group.values():
            seconds = _median_s(result)
            if not seconds > 0:
                continue
            gflops = (case.pass_flops if result.role == "sgemm" else case.flops) / seconds / 1e9
            derived = {"gflops": gflops, "pct_sgemm": _finite(100.0 * gflops / sgemm_gflops),
                       "speedup": {}, "memory_ratio": {}, "inertia_ratio": {}}
            for name in BASELINES[workload] if result.role != "sgemm" else ():
                base = group.get(name)
                derived["speedup"][name] = _finite(_median_s(base) / seconds)
                derived["memory_ratio"][name] = _finite(_run_memory(result) / _run_memory(base))
                mine = (result.check or {}).get("inertia")
                theirs = ((base.check or {}) if base else {}).get("inertia")
                if mine is not None and theirs:
                    derived["inertia_ratio"][name] = mine / theirs
            result.derived = derived


def target_lines(results: list[Result]) -> list[tuple[bool, str]]:
    """(met, text) for every fastvq row and applicable target."""
    lines = []
    for result in sorted(results, key=lambda r: WORKLOADS.index(r.case.workload)):
        if result.role != "fastvq" or not result.derived or result.provider in NOT_TARGETED:
            continue
        if not result.case.label.startswith(TARGET_LABEL_PREFIX):
            continue
        for workload, metric, baseline, required, aim, direction in TARGETS:
            if workload != result.case.workload:
                continue
            value = result.derived.get({"speedup": "speedup", "memory": "memory_ratio",
                                        "inertia": "inertia_ratio"}[metric], {}).get(baseline)
            if value is None:
                continue
            met = value >= required if direction == "higher" else value <= required
            sign = "≥" if direction == "higher" else "≤"
            what = {"speedup": f"{value:.2f}× faster than {baseline}",
                    "memory": f"{value:.3f}× the run memory of {baseline}",
                    "inertia": f"inertia {value:.4f}× {baseline}'s"}[metric]
            aim_text = f", aim {sign} {aim:g}" if aim != required else ""
            lines.append((met, f"{workload} {result.case.label} ({result.case.shape}) {result.provider}: "
                               f"{what} (target {sign} {required:g}{aim_text}) {'met' if met else 'MISSED'}"))
    return lines


def _fmt(value, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def headers(workload: str) -> list[str]:
    columns = ["case", "N×K×d", "provider", "ms", "IQR", "GFLOP/s", "%sgemm"]
    columns += [f"×{SHORT.get(name, name)}" for name in BASELINES[workload]]
    columns += ["peak MB", "+run MB"]
    if workload == "train":
        columns += ["run mem/vqtorch"]
    if workload == "kmeans":
        columns += ["inertia/faiss"]
    columns += ["note"]
    return columns


def table_rows(results: list[Result], workload: str) -> list[tuple[list[str], str]]:
    """(cells, style) per shown row: ok, wrong and error rows (absent ones go to the footnote)."""
    rows = []
    for result in results:
        if result.case.workload != workload or result.status == "absent":
            continue
        stats, derived = result.stats, result.derived
        label = "" if result.case.label == result.case.shape else result.case.label
        cells = [label, result.case.shape, result.provider]
        if result.timed:
            cells += [_fmt(stats.median_ms, ".1f"), f"{stats.q1_ms:.1f}–{stats.q3_ms:.1f}",
                      _fmt(derived.get("gflops"), ".1f"), _fmt(derived.get("pct_sgemm"), ".0f")]
        else:
            cells += ["—"] * 4
        for name in BASELINES[workload]:
            cells.append("1" if name == result.provider else _fmt(derived.get("speedup", {}).get(name), ".2f"))
        mem = result.memory or {}
        cells += [_fmt(mem.get("peak_rss_mb"), ".0f"), _fmt(mem.get("delta_mb"), ".0f")]
        if workload == "train":
            cells.append(_fmt(derived.get("memory_ratio", {}).get("vqtorch"), ".3f"))
        if workload == "kmeans":
            cells.append(_fmt(derived.get("inertia_ratio", {}).get("faiss-kmeans"), ".4f"))
        note = ""
        check = result.check or {}
        if result.status != "ok":
            note = f"{result.status.upper()}: {result.reason}"
        elif "recall_at_1" in check:
            probes = f", nprobe {check['nprobe']}/{check['nlist']}" if "nprobe" in check else ""
            note = f"recall@1 {check['recall_at_1']:.3f} ({check['rows']} rows{probes})"
        elif "error" in mem:
            note = f"memory: {mem['error']}"
        elif result.role == "sgemm":
            note = "yardstick (N×K product)"
        cells.append(note)
        style = {"sgemm": "dim", "fastvq": "bold"}.get(result.role, "")
        rows.append((cells, "red" if result.status != "ok" else style))
    return rows


def absent_lines(results: list[Result], workload: str) -> list[str]:
    """One line per (provider, reason) among absent providers; 'not applicable' ones are left out."""
    seen: dict[tuple[str, str], list[str]] = {}
    for result in results:
        if result.case.workload == workload and result.status == "absent" and not result.reason.startswith("not applicable"):
            seen.setdefault((result.provider, result.reason), []).append(result.case.label)
    return [f"{provider}: {reason}" for (provider, reason) in seen]


def render(results: list[Result], machine_line: str, console=None) -> str:
    """Print the tables (rich if installed, plain text otherwise); return the plain text too."""
    try:
        from rich.table import Table
    except ImportError:
        Table = None
    if Table is not None and console is None:
        console = _console()
    plain = []
    for workload in WORKLOADS:
        rows = table_rows(results, workload)
        absent = absent_lines(results, workload)
        if not rows and not absent:
            continue
        title = f"{WORKLOAD_TITLES[workload]} | {machine_line}"
        columns = headers(workload)
        plain.append(_plain_table(title, columns, [cells for cells, _ in rows], absent))
        if Table is not None:
            table = Table(title=title, title_justify="left", caption_justify="left",
                          caption="\n".join(f"absent: {a}" for a in absent) or None)
            for i, header in enumerate(columns):
                last = i == len(columns) - 1
                table.add_column(header, justify="left" if i < 3 or last else "right", no_wrap=not last,
                                 overflow="fold")
            for cells, style in rows:
                table.add_row(*cells, style=style or None)
            console.print(table)
    targets = target_lines(results)
    if targets:
        plain.append("targets (ratios within this run):\n" + "\n".join(f"  {text}" for _, text in targets))
        if Table is not None:
            console.print("[bold]targets[/bold] (ratios within this run)")
            for met, text in targets:
                console.print(f"  [{'green' if met else 'red'}]{text}[/]", highlight=False, soft_wrap=True)
    text = "\n\n".join(plain)
    if Table is None:
        print(text)
    return text


def _console():
    """A rich console; when the output is not a terminal (a file, CI), wide enough for every column."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=220)


def _plain_table(title: str, header: list[str], rows: list[list[str]], absent: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines += [f"absent: {a}" for a in absent]
    return "\n".join(lines)


def markdown(results: list[Result], machine_line: str, command: str) -> str:
    """The tables as GitHub markdown, for the README: one table per workload, then the targets."""
    parts = [f"Measured with `{command}` on {machine_line}."]
    for workload in WORKLOADS:
        rows = table_rows(results, workload)
        if not rows:
            continue
        columns = headers(workload)
        lines = [f"**{WORKLOAD_TITLES[workload]}**", "", "| " + " | ".join(columns) + " |",
                 "|" + "|".join("---:" if 3 <= i < len(columns) - 1 else "---" for i in range(len(columns))) + "|"]
        for cells, _ in rows:
            bold = cells[2].startswith("fastvq")
            shown = [f"**{c}**" if bold and c not in ("", "—") and i >= 2 else c for i, c in enumerate(cells)]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in shown) + " |")
        absent = absent_lines(results, workload)
        if absent:
            lines += [""] + [f"absent: {a}" for a in absent]
        parts.append("\n".join(lines))
    targets = target_lines(results)
    if targets:
        parts.append("Targets (ratios within this run):\n\n" + "\n".join(
            f"- {'✅' if met else '❌'} {text}" for met, text in targets))
    return "\n\n".join(parts) + "\n"


def to_json(results: list[Result], machine: dict, meta: dict) -> dict:
    return {"schema": SCHEMA, **meta, "machine": machine, "results": [r.to_json() for r in results],
            "targets": [{"met": met, "text": text} for met, text in target_lines(results)]}


def write_json(path: str, document: dict) -> None:
    with open(path, "w") as handle:
        json.dump(_clean(document), handle, indent=1, allow_nan=False)
        handle.write("\n")


def _clean(value):
    """NaN and ±inf become null, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    return value
