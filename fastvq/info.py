"""``python -m fastvq.info``: which backends this install has, and why each missing one is missing."""
from __future__ import annotations

import os
import platform

import torch

from . import __version__
from .dispatch import BACKEND_NAMES, ENV_VAR, PARTIAL_OPS, explain, get_backend, resolve


def report() -> str:
    lines = [
        f"fastvq {__version__}  torch {torch.__version__}  python {platform.python_version()}  "
        f"{platform.machine()}  {os.cpu_count()} cpus  torch threads {torch.get_num_threads()}",
        f"torch CPU capability: {torch.backends.cpu.get_cpu_capability()}  "
        f"CUDA available: {torch.cuda.is_available()}",
    ]
    if os.environ.get(ENV_VAR):
        lines.append(f"${ENV_VAR}={os.environ[ENV_VAR]} overrides every backend argument")
    lines.append("")
    probes = {"cpu float32": torch.empty(1, 1)}
    if torch.cuda.is_available():
        probes["cuda float32"] = torch.empty(1, 1, device="cuda")
    width = max(len(name) for name in BACKEND_NAMES)
    lines.append(f"{'backend':<{width}}  status")
    for name in BACKEND_NAMES:
        reason = get_backend(name).unavailable_reason()
        detail = get_backend(name).describe()
        status = "available" + (f" ({detail})" if detail else "") if reason is None else f"unavailable: {reason}"
        lines.append(f"{name:<{width}}  {status}")
        if reason is None:
            for op in PARTIAL_OPS:
                for why in get_backend(name).op_not_supported_reasons(op):
                    lines.append(f"{'':<{width}}  lacks {why}")
            for op, why in get_backend(name).op_fallbacks().items():
                lines.append(f"{'':<{width}}  falls back: {why}")
    for label, probe in probes.items():
        lines.append("")
        try:
            chosen = resolve("auto", probe, probe).name
        except Exception as error:  # report, never crash the report
            chosen = f"error: {error}"
        lines.append(f"{label} inputs -> auto picks {chosen!r}")
        for name, reasons in explain(probe, probe).items():
            if reasons:
                lines.append(f"  {name:<{width}}  not used: {'; '.join(reasons)}")
    if not torch.cuda.is_available():
        lines.append("")
        lines.append("cuda inputs -> auto order triton, cuda, torch (no CUDA device here to probe)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
