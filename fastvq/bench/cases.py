"""What is timed: the workloads, the named shapes of each sweep, and the seeded tensors of a case."""
import re
from dataclasses import dataclass, replace

import torch

WORKLOADS = ("nearest_code", "nearest_codes", "train", "kmeans", "rvq_train", "rvq_beam")
TOPK = 8  # the k of the nearest_codes workload (issue 11: top-k at k = 8)
# The training step runs vector-quantize-pytorch's defaults in both libraries (decay 0.8, commitment 1.0,
# the rotation trick), the configuration a model swapped from vqp trains with.
COMMITMENT_WEIGHT = 1.0  # vqp's default; the check's loss
# The providers' roles that time a physical limit, unchecked: the N×K product (sgemm) and, for streaming calls,
# one read of the int8 codes (memory)
YARDSTICKS = ("sgemm", "memory")
TITLES = {"nearest_code": "nearest_code forward: search + gather", "kmeans": "k-means (Lloyd)",
          "nearest_codes": f"nearest_codes: the {TOPK} nearest codes of each row, sorted",
          "train": "training step: forward + backward + EMA update",
          "rvq_train": "ResidualVQ training step: forward + backward + EMA update, every level",
          "rvq_beam": "ResidualVQ beam-search encode (eval)"}


@dataclass(frozen=True)
class Case:
    workload: str
    label: str
    n: int
    k: int
    d: int
    l2norm: bool = False
    iters: int = 10  # k-means iterations; unused by the other workloads
    dtype: str = "float32"  # of x and the codebook; bfloat16 only for nearest_code (GPU tensor cores)
    device: str = "cpu"
    levels: int = 1  # ResidualVQ levels (rvq_* workloads)
    beam: int = 1  # ResidualVQ beam width (rvq_beam)

    @property
    def shape(self) -> str:
        return (f"{self.n}x{self.k}x{self.d}" + "-l2" * self.l2norm + "-bf16" * (self.dtype == "bfloat16")
                + f"-L{self.levels}" * (self.levels > 1) + f"-beam{self.beam}" * (self.beam > 1))

    @property
    def pass_flops(self) -> float:
        """2·N·K·d: the FLOPs of one N×K product, i.e. of one nearest-code pass (k-means does ``iters``)."""
        return 2.0 * self.n * self.k * self.d

    @property
    def int8_code_bytes(self) -> int:
        """The bytes the cpu backend's int8 scan reads for the codes of a call: each code's int8 entries (d rounded
        up to 4) and its float32 scale and norm (csrc/cpu/prefilter.h: QuantizedCodes)."""
        return self.k * ((self.d + 3) // 4 * 4 + 8)

    @property
    def flops(self) -> float:
        return self.pass_flops * (self.iters if self.workload == "kmeans" else self.levels * self.beam)


def _nc(label: str, n: int, k: int, d: int, **options) -> Case:
    return Case("nearest_code", label, n, k, d, **options)


# The default sweep; N is batch × tokens of the model a shape is named after.
DEFAULT_CASES = (
    _nc("maskgit", 16384, 1024, 256),  # MaskGIT: 16×16 tokens per image, batch 64
    _nc("vqgan", 2048, 16384, 256), _nc("vqgan-l2", 4096, 16384, 8, l2norm=True),  # VQGAN f16; factorized l2 codes
    _nc("encodec", 12000, 1024, 128),  # SoundStream/EnCodec: 10 s at 75 frames/s, batch 16
    *(_nc(f"k{k}", 2048, k, 64) for k in (256, 1024, 4096, 16384)), _nc("large-k", 2048, 65536, 64),  # a K scan
    _nc("core-1", 32768, 1024, 64), _nc("core-2", 16384, 16384, 64), _nc("core-3", 8192, 65536, 32),  # the issue's
    # streaming: a frame or a few tokens at a time against a large codebook (issue 13: the pack cache)
    _nc("stream-1", 1, 65536, 64), _nc("stream-16", 16, 65536, 64),
    *(Case("nearest_codes", f"core-{i}", n, k, d) for i, (n, k, d) in
      enumerate(((32768, 1024, 64), (16384, 16384, 64), (8192, 65536, 32)), start=1)),
    Case("train", "core-1", 32768, 1024, 64), Case("train", "core-2", 16384, 16384, 64),
    Case("kmeans", "core-1", 32768, 1024, 64),  # a 1024-code codebook for one core-1 batch
    # ResidualVQ (issue 11): an EnCodec-sized batch of frames, 8 levels of 1024 codes, vqp's defaults
    Case("rvq_train", "core-rvq", 16384, 1024, 128, levels=8),
    Case("rvq_beam", "core-rvq", 16384, 1024, 128, levels=8, beam=4),
)
# On a GPU also bf16 (tensor cores), and a shape big enough to fill an H100.
CUDA_CASES = (*(replace(c, dtype="bfloat16") for c in DEFAULT_CASES
                if c.workload == "nearest_code" and c.label.startswith("core")),
              _nc("big", 65536, 16384, 256), _nc("big", 65536, 16384, 256, dtype="bfloat16"))
# --quick: every workload and code path once, on small shapes (the CI smoke test, < 1 minute; k-means 5 iterations).
QUICK_CASES = (_nc("small", 4096, 1024, 64), _nc("small-k16k", 512, 16384, 32), Case("nearest_codes", "small", 4096, 1024, 64),
               _nc("small-l2", 2048, 4096, 8, l2norm=True), Case("train", "small", 2048, 1024, 64),
               Case("kmeans", "small", 2048, 128, 32), Case("rvq_train", "small", 2048, 256, 32, levels=4),
               Case("rvq_beam", "small", 2048, 256, 32, levels=4, beam=4))
RESIDUAL_SHAPE = {"rvq_train": {"levels": 4}, "rvq_beam": {"levels": 4, "beam": 4}}  # of an NxKxd --shapes entry
_SHAPE = re.compile(r"^([1-9]\d*)x([1-9]\d*)x([1-9]\d*)(-l2)?(-bf16)?$")


def select_cases(quick: bool, shapes: str | None, workloads: tuple[str, ...], device: str = "cpu",
                 kmeans_iters: int | None = None) -> tuple[Case, ...]:
    """The sweep's cases of ``workloads``, or those --shapes names: sweep labels (their cases) and/or
    NxKxd[-l2][-bf16] shapes (one case per workload). Training and k-means stay float32; k-means needs K <= N."""
    sweep = QUICK_CASES if quick else DEFAULT_CASES + (CUDA_CASES if device.startswith("cuda") else ())
    tokens, cases = [t.strip() for t in shapes.split(",")] if shapes is not None else [], []
    for token in tokens:
        if match := _SHAPE.match(token):
            n, k, d = map(int, match.group(1, 2, 3))
            dtype = "bfloat16" if match.group(5) else "float32"
            cases += [Case(w, token, n, k, d, l2norm=bool(match.group(4)), dtype=dtype, **RESIDUAL_SHAPE.get(w, {}))
                      for w in workloads]
        elif token in {c.label for c in sweep}:
            cases += [c for c in sweep if c.label == token and c.workload in workloads]
        else:
            raise ValueError(f"--shapes entry {token!r} must be NxKxd with N, K, d >= 1 (optionally -l2, -bf16) "
                             f"or one of the sweep's labels {sorted({c.label for c in sweep})}")
    cases = dict.fromkeys(cases) if shapes is not None else [c for c in sweep if c.workload in workloads]
    return tuple(replace(c, device=device, iters=kmeans_iters or (5 if quick else c.iters)) for c in cases
                 if (c.dtype == "float32" or c.workload == "nearest_code") and (c.workload != "kmeans" or c.k <= c.n))


@dataclass
class Data:
    x: torch.Tensor  # (N, d)
    codebook: torch.Tensor  # (K, d); the initial codebook for train
    grad_out: torch.Tensor | None  # (N, d) upstream gradient of the quantized output (train only)


def make_data(case: Case, seed: int = 0) -> Data:
    """Gaussian x and codebook (unit rows with l2norm) from a seeded CPU generator, moved to the case's device."""
    generator = torch.Generator().manual_seed(seed)
    x, codebook = torch.randn(case.n, case.d, generator=generator), torch.randn(case.k, case.d, generator=generator)
    if case.l2norm:
        x, codebook = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(codebook, dim=1)
    training = case.workload in ("train", "rvq_train")
    grad = torch.randn(case.n, case.d, generator=generator).to(case.device) if training else None
    dtype = getattr(torch, case.dtype)
    return Data(x.to(case.device, dtype), codebook.to(case.device, dtype), grad)
