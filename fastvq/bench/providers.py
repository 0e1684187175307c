"""What a provider is, and the registry of every provider by workload.

A provider is one way of doing a workload (naive PyTorch, faiss, a fastvq backend, ...).
``absent_reason(case, data)`` says why it cannot run here (missing package, not
applicable); ``prepare(case, data)`` returns a Runner holding everything built
outside the timed call (a faiss index, a module). Third-party packages are imported
inside these methods only, so importing fastvq.bench never imports faiss or
vector_quantize_pytorch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .verify import Oracle, Verdict
from .workloads import Case, CaseData

# Roles: "sgemm" is the machine's yardstick (torch.mm of the same shapes), never checked;
# "approximate" providers are timed even when some rows miss, and report recall@1 instead.
ROLES = ("sgemm", "baseline", "fastvq", "approximate")


@dataclass
class Check:
    verdict: Verdict | None  # None for the sgemm yardstick
    extra: dict = field(default_factory=dict)  # e.g. {"inertia": ...}

    @property
    def ok(self) -> bool:
        return self.verdict is None or self.verdict.ok


class Runner:
    def __call__(self) -> None:
        """One timed run."""
        raise NotImplementedError

    def checked_run(self, rows: Tensor, oracle: Oracle) -> Check:
        """One run whose output is checked against the oracle on ``rows`` (also a warm-up)."""
        raise NotImplementedError


class Provider:
    name: str = ""
    workload: str = ""
    role: str = "baseline"
    description: str = ""
    # Excluded unless named in --providers (the fastvq "torch" backend is the slow oracle).
    opt_in: bool = False

    def absent_reason(self, case: Case, data: CaseData) -> str | None:
        return None

    def prepare(self, case: Case, data: CaseData) -> Runner:
        raise NotImplementedError


def import_reason(module: str) -> str | None:
    """Why ``module`` cannot be imported, or None (the import is cached by Python either way)."""
    try:
        __import__(module)
    except Exception as error:  # a missing or broken package makes the provider absent, never a crash
        return f"{module} is not importable ({type(error).__name__}: {error})"
    return None


def fastvq_backend_reason(backend: str, *tensors: Tensor) -> str | None:
    """Why fastvq's ``backend`` is not a performance path for these tensors, or None."""
    from ..dispatch import explain

    reasons = explain(*tensors).get(backend)
    if reasons is None:
        return f"fastvq has no backend {backend!r}"
    if reasons:
        return "; ".join(reasons)
    if backend == "triton" and all(t.device.type == "cpu" for t in tensors):
        return "triton runs CPU tensors only through its interpreter, which is not a performance path"
    return None


def fastvq_backends() -> tuple[str, ...]:
    from ..dispatch import BACKEND_NAMES

    return BACKEND_NAMES


def all_providers() -> dict[str, list[Provider]]:
    """workload -> providers, the sgemm yardstick first."""
    from . import kmeans_providers, search_providers, train_providers

    return {
        "search": search_providers.providers(),
        "train": train_providers.providers(),
        "kmeans": kmeans_providers.providers(),
    }


def provider_names() -> list[str]:
    return sorted({p.name for group in all_providers().values() for p in group})


def select_providers(names: str | None) -> dict[str, list[Provider]]:
    """``--providers a,b``: keep these names (and always the sgemm yardstick); None keeps the defaults."""
    groups = all_providers()
    if names is None:
        return {w: [p for p in group if not p.opt_in] for w, group in groups.items()}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = provider_names()
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise ValueError(f"--providers must be a comma-separated subset of {known}, got {names!r}")
    return {w: [p for p in group if p.role == "sgemm" or p.name in wanted] for w, group in groups.items()}
