"""What is timed: the workloads, the named shapes of each sweep, and the tensors for a case.

A case is one (workload, shape). Its tensors come from a seeded generator, so the
parent process and each memory-measuring child build bit-identical inputs.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

import torch

WORKLOADS = ("search", "train", "kmeans")
WORKLOAD_TITLES = {
    "search": "search forward: nearest_code + gather",
    "train": "training step: forward + backward + EMA update",
    "kmeans": "k-means (Lloyd)",
}


@dataclass(frozen=True)
class Case:
    workload: str
    label: str
    n: int
    k: int
    d: int
    l2norm: bool = False
    iters: int = 10  # k-means iterations; unused by the other workloads

    @property
    def shape(self) -> str:
        return f"{self.n}x{self.k}x{self.d}" + ("-l2" if self.l2norm else "")

    @property
    def pass_flops(self) -> float:
        """2·N·K·d: the FLOPs of one N×K product, i.e. of one nearest-code pass."""
        return 2.0 * self.n * self.k * self.d

    @property
    def flops(self) -> float:
        """GEMM-equivalent FLOPs of one run: one pass, or ``iters`` passes for k-means."""
        return self.pass_flops * (self.iters if self.workload == "kmeans" else 1)

    def to_json(self) -> dict:
        return asdict(self) | {"shape": self.shape, "flops": self.flops}


# The default sweep. N is batch × tokens of the model each shape is named after.
DEFAULT_CASES = (
    # MaskGIT: 16×16 tokens per image, batch 64.
    Case("search", "maskgit", 16384, 1024, 256),
    # VQGAN f16: 16×16 tokens, batch 8; and its factorized, l2-normalized d=8 codes at batch 16.
    Case("search", "vqgan", 2048, 16384, 256),
    Case("search", "vqgan-l2", 4096, 16384, 8, l2norm=True),
    # SoundStream / EnCodec: 10 s at 75 frames/s, batch 16 (one residual level).
    Case("search", "encodec", 12000, 1024, 128),
    # A large codebook: 16×16 tokens, batch 8; with the K scan below at the same N and d, it draws
    # the time-vs-K line of the plot.
    Case("search", "large-k", 2048, 65536, 64),
    *(Case("search", f"k{k}", 2048, k, 64) for k in (256, 1024, 4096, 16384)),
    # The core issue's three shapes.
    Case("search", "core-1", 32768, 1024, 64),
    Case("search", "core-2", 16384, 16384, 64),
    Case("search", "core-3", 8192, 65536, 32),
    # The training-step targets against vector-quantize-pytorch.
    Case("train", "core-1", 32768, 1024, 64),
    Case("train", "core-2", 16384, 16384, 64),
    # Fitting a 1024-code codebook to one batch of core-1 features.
    Case("kmeans", "core-1", 32768, 1024, 64, iters=10),
)

# --quick: every workload and code path once, on small shapes (CI smoke test, < 1 minute).
QUICK_CASES = (
    Case("search", "small", 4096, 1024, 64),
    Case("search", "small-k16k", 512, 16384, 32),
    Case("search", "small-l2", 2048, 4096, 8, l2norm=True),
    Case("train", "small", 2048, 1024, 64),
    Case("kmeans", "small", 2048, 128, 32, iters=5),
)

_SHAPE = re.compile(r"^(\d+)x(\d+)x(\d+)(-l2)?$")


def parse_shapes(spec: str, workloads: tuple[str, ...], sweep: tuple[Case, ...]) -> tuple[Case, ...]:
    """``--shapes``: comma-separated labels from the sweep and/or NxKxd shapes (NxKxd-l2: l2-normalized).

    A label keeps the cases of that name (in every selected workload); an explicit
    shape becomes one case per selected workload.
    """
    if not isinstance(spec, str):
        raise TypeError(f"shapes must be a str, got {type(spec).__name__}")
    cases: list[Case] = []
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    if not tokens:
        raise ValueError("--shapes must name at least one label or NxKxd shape, got an empty string")
    labels = {case.label for case in sweep}
    for token in tokens:
        match = _SHAPE.match(token)
        if match:
            n, k, d = (int(match.group(i)) for i in (1, 2, 3))
            if min(n, k, d) < 1:
                raise ValueError(f"--shapes entry {token!r} must have N, K, d >= 1")
            cases += [Case(w, token, n, k, d, l2norm=bool(match.group(4))) for w in workloads]
        elif token in labels:
            cases += [c for c in sweep if c.label == token and c.workload in workloads]
        else:
            raise ValueError(
                f"--shapes entry {token!r} must be NxKxd (optionally with -l2), or one of the sweep's labels "
                f"{sorted(labels)}"
            )
    return tuple(dict.fromkeys(cases))


def select_cases(quick: bool, shapes: str | None, workloads: tuple[str, ...], kmeans_iters: int | None) -> tuple[Case, ...]:
    sweep = QUICK_CASES if quick else DEFAULT_CASES
    if shapes is None:
        cases = tuple(c for c in sweep if c.workload in workloads)
    else:
        cases = parse_shapes(shapes, workloads, sweep)
    if kmeans_iters is not None:
        cases = tuple(replace(c, iters=kmeans_iters) if c.workload == "kmeans" else c for c in cases)
    return cases


@dataclass
class CaseData:
    x: torch.Tensor  # (N, d) float32
    codebook: torch.Tensor  # (K, d) float32; the initial codebook for train; unused by k-means
    grad_out: torch.Tensor | None  # (N, d) upstream gradient of the quantized output (train only)


def make_data(case: Case, seed: int = 0) -> CaseData:
    """Gaussian features and codebook (unit rows with l2norm), float32, from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(case.n, case.d, generator=generator)
    codebook = torch.randn(case.k, case.d, generator=generator)
    if case.l2norm:
        x = torch.nn.functional.normalize(x, dim=1)
        codebook = torch.nn.functional.normalize(codebook, dim=1)
    grad_out = torch.randn(case.n, case.d, generator=generator) if case.workload == "train" else None
    return CaseData(x, codebook, grad_out)


def pytest_cases(workload: str, environ=None) -> tuple[Case, ...]:
    """Cases for the pytest-benchmark suites: the core shapes of the default sweep, or
    $FASTVQ_BENCH_SHAPES (the --shapes syntax), or the --quick sweep if $FASTVQ_BENCH_QUICK=1."""
    import os

    environ = os.environ if environ is None else environ
    quick = environ.get("FASTVQ_BENCH_QUICK", "") == "1"
    shapes = environ.get("FASTVQ_BENCH_SHAPES") or (None if quick else "core-1,core-2,core-3")
    return select_cases(quick, shapes, (workload,), None)
