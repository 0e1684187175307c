"""The rotation trick fused into quantize_backward, the same test bodies on every (backend, device).

``ops.quantize(x, codebook, cw, cbw, backend, rotation_trick=True)`` then a backward is judged
against the oracle ``reference.quantize(..., rotation_trick=True)`` with autograd (vector-quantize-
pytorch's formula, not the closed form the kernels implement) and against vqp's own ``rotate_to``.
The oracle is given the indices the backend chose, after the judge has accepted them as nearest
codes: a float32 near-tie may legitimately pick another code, and the backward is what is tested.

(backend, device) pairs: cpu on the CPU, triton and cuda on a CUDA device, and triton on CPU
tensors when this process runs with TRITON_INTERPRET=1. Without it,
test_interpreter_cases_in_a_fresh_process re-runs the ``triton and cpu`` cases of this file in a
new process with TRITON_INTERPRET=1 (Triton reads the variable when it is imported).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from fastvq import dispatch, ops, reference

from conftest import TOLERANCES

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
PAIRS = [("cpu", "cpu"), ("triton", "cuda"), ("cuda", "cuda")] + ([("triton", "cpu")] if INTERPRETING else [])
# The interpreter runs every program in Python: keep its cases to N·K·d <= this.
INTERPRETER_MAX_ELEMENTS = 100_000

CW, CBW = 0.25, 1.0  # commitment and codebook weights
GRAD_LOSS = 0.75  # the upstream gradient of the loss
F32 = TOLERANCES[torch.float32]
HALF_DTYPES = (torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    monkeypatch.delenv("FASTVQ_BACKEND", raising=False)


def interpreted(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu"


def cases(shapes):
    """pytest params (backend, device, *shape) for every pair, the interpreter's kept small."""
    return [pytest.param(backend, device, *shape, id=f"{backend}-{device}-{'x'.join(map(str, shape))}")
            for backend, device in PAIRS for shape in shapes
            if not (interpreted(backend, device) and math.prod(shape) > INTERPRETER_MAX_ELEMENTS)]


def pair_cases():
    return [pytest.param(backend, device, id=f"{backend}-{device}") for backend, device in PAIRS]


def require(backend: str, device: str) -> None:
    """Skip unless `backend` runs on `device` here, with the dispatcher's reason."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reasons = dispatch.get_backend(backend).not_supported_reasons(torch.empty(1, 1, device=device))
    if reasons:
        pytest.skip(f"backend {backend!r} cannot run on {device}: {'; '.join(reasons)}")


def randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---- running the op and the two oracles ------------------------------------------------------
def fused(x, codebook, grad, backend, device, rotation_trick=True, cw=CW, cbw=CBW):
    """ops.quantize + backward on `device`: (quantized, indices, grad_x, grad_codebook) on the CPU.
    `x` and `grad` may be views: they are made on the device with the same strides."""
    x = _same_layout(x, device).requires_grad_()
    codebook = codebook.to(device).requires_grad_()
    quantized, indices, loss = ops.quantize(x, codebook, cw, cbw, backend, rotation_trick)
    assert quantized.dtype == x.dtype and quantized.shape == x.shape
    torch.autograd.backward((quantized, loss), (_same_layout(grad, device), torch.tensor(GRAD_LOSS, device=device)))
    assert x.grad.dtype == x.dtype and codebook.grad.dtype == codebook.dtype
    return tuple(t.detach().cpu() for t in (quantized, indices, x.grad, codebook.grad))


def _same_layout(t, device):
    if t.device.type == device:
        return t.detach()
    base = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
    return base.copy_(t.detach())


def oracle(x, codebook, grad, indices, rotation_trick=True, cw=CW, cbw=CBW):
    """(grad_x, grad_codebook) of reference.quantize with autograd, in float32 on the CPU, with
    its search pinned to `indices` (already judged nearest by the caller)."""
    x = x.detach().cpu().float().requires_grad_()
    codebook = codebook.detach().cpu().float().requires_grad_()
    with mock.patch.object(reference, "nearest_code", lambda *_: (indices.cpu(), None)):
        quantized, _, loss = reference.quantize(x, codebook, cw, cbw, rotation_trick=rotation_trick)
    torch.autograd.backward((quantized, loss), (grad.cpu().float(), torch.tensor(GRAD_LOSS)))
    return x.grad, codebook.grad


def vqp_grad_x(x, codebook, grad, indices, cw=CW):
    """grad_x from vector-quantize-pytorch's own rotate_to plus the commitment loss, float32."""
    vqp = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    x = x.detach().cpu().float().requires_grad_()
    codes = codebook.detach().cpu().float()[indices.cpu()]
    commitment = cw * ((x - codes) ** 2).mean()
    torch.autograd.backward((vqp.rotate_to(x, codes), commitment), (grad.cpu().float(), torch.tensor(GRAD_LOSS)))
    return x.grad


def row_scale(x, codebook, indices):
    """(N, 1): max(s, 1) of each row, s = ‖q‖/max(‖x‖, ε). A row's float32 error is about
    s·u·‖g‖ in every entry, however small the entry, so gradients are compared divided by this:
    rows with s <= 1 as they are, rows with a huge s (‖x‖ ≲ ε: up to ~1e7) relative to s."""
    x, codes = x.detach().cpu().float(), codebook.detach().cpu().float()[indices.cpu()]
    s = codes.norm(dim=1, keepdim=True) / x.norm(dim=1, keepdim=True).clamp_min(reference.ROTATION_EPS)
    return s.clamp_min(1.0)


def check_gradients(x, codebook, grad, backend, device, dtype=torch.float32):
    """The fused op's gradients vs the autograd oracle (and grad_x vs vqp's rotate_to)."""
    quantized, indices, grad_x, grad_codebook = fused(x, codebook, grad, backend, device)
    reference.assert_nearest(x, codebook, indices)
    want_x, want_codebook = oracle(x, codebook, grad, indices)
    scale = row_scale(x, codebook, indices)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(grad_x.float() / scale, want_x / scale, **tol)
    torch.testing.assert_close(grad_codebook.float(), want_codebook, **tol)
    torch.testing.assert_close(grad_x.float() / scale, vqp_grad_x(x, codebook, grad, indices) / scale, **tol)
    return quantized, indices, grad_x


# ---- the gradients ----------------------------------------------------------------------------
SHAPES = [  # (N, K, d): every N in {1, 3, 33, 257, 1030}, K in {1, 3, 257}, d in {1, 3, 33, 64, 130}
    (1, 1, 1), (1, 257, 130), (3, 3, 3), (3, 257, 1), (33, 1, 130), (33, 3, 33), (33, 257, 64),
    (257, 3, 64), (257, 257, 3), (257, 1, 33), (1030, 3, 1), (1030, 1, 3), (1030, 257, 130), (1030, 3, 33),
]


@pytest.mark.parametrize("backend,device,num_rows,num_codes,dim", cases(SHAPES))
def test_rotation_gradients_match_the_oracle(backend, device, num_rows, num_codes, dim):
    require(backend, device)
    seed = num_rows * 1000 + num_codes * 10 + dim
    x, codebook = randn(num_rows, dim, seed=seed), randn(num_codes, dim, seed=seed + 1)
    grad = randn(num_rows, dim, seed=seed + 2)
    quantized, indices, _ = check_gradients(x, codebook, grad, backend, device)
    assert torch.equal(quantized, codebook[indices])  # no row here has ‖x‖ < ε


@pytest.mark.parametrize("backend,device", pair_cases())
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_rotation_non_contiguous_x_and_grad(backend, device, layout):
    require(backend, device)
    num_rows, dim = 33, 33
    if layout == "transposed":
        x, grad = randn(dim, num_rows, seed=1).t(), randn(dim, num_rows, seed=2).t()
    else:
        x, grad = randn(2 * num_rows, dim + 7, seed=1)[::2, 3:3 + dim], randn(num_rows, 2 * dim, seed=2)[:, ::2]
    assert not x.is_contiguous() and not grad.is_contiguous() and x.shape == grad.shape == (num_rows, dim)
    check_gradients(x, randn(257, dim, seed=3), grad, backend, device)


@pytest.mark.parametrize("backend,device", pair_cases())
def test_rotation_empty_batch(backend, device):
    require(backend, device)
    codebook = randn(3, 5, seed=0)
    quantized, indices, grad_x, grad_codebook = fused(torch.empty(0, 5), codebook, torch.empty(0, 5), backend, device)
    assert quantized.shape == grad_x.shape == (0, 5) and indices.shape == (0,)
    assert torch.equal(grad_codebook, torch.zeros_like(codebook))


@pytest.mark.parametrize("backend,device", pair_cases())
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_rotation_half_inputs(backend, device, dtype):
    require(backend, device)
    x, codebook = randn(33, 64, seed=4, dtype=dtype), randn(257, 64, seed=5, dtype=dtype)
    grad = randn(33, 64, seed=6, dtype=dtype)
    reasons = dispatch.get_backend(backend).not_supported_reasons(x.to(device), codebook.to(device))
    if reasons:
        pytest.skip(f"backend {backend!r} does not take {dtype}: {'; '.join(reasons)}")
    # the oracle runs in float32 on the same rounded inputs; the result is compared in its dtype's tolerance
    check_gradients(x, codebook, grad, backend, device, dtype)


def degenerate_inputs(dim: int):
    """Rows x = 0, ‖x‖ = 1e-7, x = q (a unit code and a far one), x = −q (antipodal: x̂ + q̂ = 0),
    ‖x‖ = 5e-7, then ordinary rows. Code 0 is a unit vector and the others have distinct norms
    >= 100, so code 0 is nearest to every row but the one equal to a far code."""
    codebook = randn(5, dim, seed=dim)
    codebook = codebook / codebook.norm(dim=1, keepdim=True)
    codebook[1:] *= torch.tensor([[100.0], [110.0], [120.0], [130.0]])
    direction = randn(1, dim, seed=dim + 1)
    direction = direction / direction.norm()
    x = torch.cat([torch.zeros(1, dim), 1e-7 * direction, codebook[0:1], codebook[3:4], -codebook[0:1],
                   5e-7 * direction.flip(1), randn(4, dim, seed=dim + 2)])
    return x, codebook


@pytest.mark.parametrize("backend,device", pair_cases())
@pytest.mark.parametrize("dim", [1, 3, 33, 130])
def test_rotation_degenerate_rows(backend, device, dim):
    require(backend, device)
    x, codebook = degenerate_inputs(dim)
    grad = randn(*x.shape, seed=7)
    _, indices, grad_x = check_gradients(x, codebook, grad, backend, device)
    assert indices[:6].tolist() == [0, 0, 0, 3, 0, 0]
    assert bool(torch.isfinite(grad_x).all())
    assert float(grad_x[0].abs().max()) > 1e4  # x = 0: s = ‖q‖/ε, vqp's huge but finite gradient


@pytest.mark.parametrize("backend,device", pair_cases())
def test_rotation_forward_value(backend, device):
    """quantized is codebook[indices] exactly, except where ‖x‖ < ε: there vqp's rotate_to value
    (x·‖q‖/ε rotated), and 0 for x = 0."""
    require(backend, device)
    vqp = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    x, codebook = degenerate_inputs(33)
    quantized, indices, _, _ = fused(x, codebook, torch.ones_like(x), backend, device)
    tiny = x.norm(dim=1) < reference.ROTATION_EPS
    assert tiny.tolist()[:6] == [True, True, False, False, False, True] and not tiny[6:].any()
    assert torch.equal(quantized[~tiny], codebook[indices[~tiny]])
    assert torch.equal(quantized[0], torch.zeros(33))
    torch.testing.assert_close(quantized[tiny], vqp.rotate_to(x[tiny], codebook[indices[tiny]]), **F32)


@pytest.mark.parametrize("backend,device", pair_cases())
def test_without_rotation_the_gradient_is_straight_through(backend, device):
    require(backend, device)
    x, codebook, grad = randn(33, 33, seed=8), randn(257, 33, seed=9), randn(33, 33, seed=10)
    quantized, indices, grad_x, grad_codebook = fused(x, codebook, grad, backend, device, rotation_trick=False)
    reference.assert_nearest(x, codebook, indices)
    want_x, want_codebook = oracle(x, codebook, grad, indices, rotation_trick=False)
    torch.testing.assert_close(grad_x, want_x, **F32)
    torch.testing.assert_close(grad_codebook, want_codebook, **F32)
    torch.testing.assert_close(grad_x, grad + CW * GRAD_LOSS * 2 / x.numel() * (x - codebook[indices]), **F32)


# ---- the CPU extension's own promises ----------------------------------------------------------
def test_cpu_extension_rotation_is_per_row_and_takes_no_grad_as_zero():
    _cpu = pytest.importorskip("fastvq._cpu", reason="fastvq._cpu is not built")
    x, codebook, grad = randn(1030, 33, seed=11), randn(257, 33, seed=12), randn(1030, 33, seed=13)
    indices = torch.randint(0, 257, (1030,), generator=torch.Generator().manual_seed(14))

    def run(grad, num_threads):
        grad_x, grad_codebook = torch.empty_like(x), torch.empty_like(codebook)
        _cpu.quantize_backward(grad, x, codebook, indices, 0.5, 2.0, grad_x, grad_codebook, num_threads,
                               rotation_trick=True)
        return grad_x, grad_codebook

    one = run(grad, 1)
    for threads in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(run(grad, threads), one)), f"num_threads={threads}"
    want_x, want_codebook = reference.quantize_backward(grad, x, codebook, indices, torch.tensor(0.5),
                                                        torch.tensor(2.0), rotation_trick=True)
    torch.testing.assert_close(one[0], want_x, **F32)
    torch.testing.assert_close(one[1], want_codebook, **F32)
    no_grad_x, _ = run(None, 2)  # no upstream gradient: only the commitment term
    torch.testing.assert_close(no_grad_x, 0.5 * (x - codebook[indices]), **F32)


# ---- the interpreter cases, when this process cannot run them ------------------------------------
@pytest.mark.skipif(INTERPRETING, reason="this process runs the triton-cpu cases itself")
def test_interpreter_cases_in_a_fresh_process():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("FASTVQ_BACKEND", "FASTVQ_DETERMINISTIC")}
    env["TRITON_INTERPRET"] = "1"
    here = Path(__file__).resolve()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton and cpu", str(here)],
        cwd=here.parents[1], env=env, capture_output=True, text=True, timeout=600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0 and " passed" in summary and "skipped" not in summary, (
        result.stdout[-8000:] + result.stderr[-4000:])
