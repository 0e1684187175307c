"""Shared test fixtures: backends to run the same test body on, and the tolerance table."""
from __future__ import annotations

import pytest
import torch

from fastvq import dispatch, reference

# Per-dtype tolerances for values computed by a kernel vs the fp32/fp64 oracle.
# Half-precision *inputs* are still computed in float32, so float32 bounds apply to
# sqdist and gradients; the half entries bound results rounded back to that dtype.
TOLERANCES = {
    torch.float64: dict(atol=1e-6, rtol=1e-6),  # torch backend runs fp64 as fp64; sqdist is fp32
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=8e-3),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
}

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}

# Backends every core test runs on. Triton has its own interpreter tests.
CORE_BACKENDS = ("cpu", "torch")


def backend_or_skip(name: str, *tensors) -> str:
    reasons = dispatch.get_backend(name).not_supported_reasons(*tensors)
    if reasons:
        pytest.skip(f"backend {name!r} cannot run here: {'; '.join(reasons)}")
    return name


@pytest.fixture(params=CORE_BACKENDS)
def backend(request) -> str:
    return backend_or_skip(request.param, torch.empty(1, 1))


def exact_sqdist(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    x64, e64 = x.double(), codebook.double()
    return ((x64 - e64[indices]) ** 2).sum(-1)


def assert_nearest(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> None:
    """Each chosen code is a nearest code, up to the rounding a float32 kernel may make.

    A float32 evaluation of ‖e‖² − 2x·e over d terms errs by at most about
    (d+2)·u·(‖x‖² + 2‖e‖²) (u = 2^-24), so two codes can swap only when their exact
    distances differ by less than twice that. Anything further apart is a wrong answer.
    """
    assert indices.dtype == torch.int64 and indices.shape == x.shape[:1]
    if x.shape[0] == 0:
        return
    best_index, _ = reference.nearest_code(x.double(), codebook.double())
    best = exact_sqdist(x, codebook, best_index)
    chosen = exact_sqdist(x, codebook, indices)
    dim = x.shape[1]
    scale = (x.double() ** 2).sum(-1) + 2 * (codebook.double() ** 2).sum(-1).max()
    slack = 2 * (dim + 2) * UNIT_ROUNDOFF[torch.float32] * scale
    excess = chosen - best
    worst = int(torch.argmax(excess - slack))
    assert bool((excess <= slack).all()), (
        f"row {worst}: chose code {int(indices[worst])} at distance {float(chosen[worst])}, "
        f"but code {int(best_index[worst])} is at {float(best[worst])} (slack {float(slack[worst])})"
    )


def small_integers(*shape, low=-4, high=5, generator=None) -> torch.Tensor:
    """Exactly representable inputs: every distance a kernel computes is an exact integer."""
    return torch.randint(low, high, shape, generator=generator).to(torch.float32)


def exact_inputs_with_duplicate_codes(num_rows: int, num_codes: int, dim: int, seed: int):
    """(x, codebook) of small integers; when K > 2 the codebook repeats rows 0 and 1 later on
    (the later copy must never win), and every other row of x is a codebook row (distance 0)."""
    generator = torch.Generator().manual_seed(seed)
    codebook = small_integers(num_codes, dim, generator=generator)
    if num_codes > 2:
        codebook[num_codes // 2] = codebook[1]
        codebook[-1] = codebook[0]
    x = small_integers(num_rows, dim, generator=generator)
    x[::2] = codebook[torch.randint(0, num_codes, (len(x[::2]),), generator=generator)]
    return x, codebook
