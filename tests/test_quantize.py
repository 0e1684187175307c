"""quantize (search + gather + loss, with the straight-through or rotation-trick gradient) and
its fused backward quantize_backward, on every (backend, device) pair against fastvq.reference."""
from __future__ import annotations

from unittest import mock

import pytest
import torch

import fastvq
from fastvq import reference

from conftest import (NON_CONTIGUOUS_LAYOUTS, REDUCTION_DTYPES, REDUCTION_IDS, TOLERANCES, non_contiguous_rows,
                      randn, skip_if_slow, skip_reduction_if_redundant, to_cpu, use_reduction)

FP32 = TOLERANCES[torch.float32]


# ---- forward: values, shapes, dtypes, layouts ------------------------------------------------
@pytest.mark.parametrize("shape", [(0, 8), (5, 0, 8), (3, 8), (2, 7, 8), (1030, 8)])
def test_quantize_shapes_values_and_straight_through_gradient(pair, shape):
    generator = torch.Generator().manual_seed(len(shape))
    codebook = pair.to(torch.randn(33, 8, generator=generator))
    x = pair.to(torch.randn(*shape, generator=generator)).requires_grad_()
    quantized, indices = fastvq.quantize(x, codebook, backend=pair.backend)
    assert quantized.shape == x.shape and quantized.dtype == x.dtype and indices.shape == x.shape[:-1]
    assert quantized.device == x.device
    torch.testing.assert_close(quantized.detach(), codebook[indices], rtol=0, atol=0)
    upstream = pair.to(torch.randn(*shape, generator=generator))
    (quantized * upstream).sum().backward()
    torch.testing.assert_close(x.grad, upstream, rtol=0, atol=0)


def test_quantize_sends_no_gradient_to_the_codebook(pair):
    generator = torch.Generator().manual_seed(1)
    codebook = pair.to(torch.randn(16, 4, generator=generator)).requires_grad_()
    x = pair.to(torch.randn(50, 4, generator=generator)).requires_grad_()
    quantized, _ = fastvq.quantize(x, codebook, backend=pair.backend)
    quantized.sum().backward()
    assert codebook.grad is None
    assert x.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d).removeprefix("torch."))
def test_quantize_other_dtypes(pair, dtype):
    # float64 runs on the torch backend only: test_nearest_code.py's smoke test.
    generator = torch.Generator().manual_seed(11)
    codebook = torch.randn(257, 33, generator=generator).to(dtype)
    x = torch.randn(300, 33, generator=generator).to(dtype)
    device_x, device_codebook = pair.to(x, codebook)
    device_x.requires_grad_()
    pair.require(device_x, device_codebook)
    quantized, indices = fastvq.quantize(device_x, device_codebook, backend=pair.backend)
    assert quantized.dtype == dtype
    quantized_cpu, indices = to_cpu(quantized, indices)
    torch.testing.assert_close(quantized_cpu, codebook[indices], rtol=0, atol=0)
    pair.assert_nearest(x, codebook, indices)
    quantized.sum().backward()
    assert device_x.grad.dtype == dtype
    torch.testing.assert_close(device_x.grad.cpu(), torch.ones_like(x), rtol=0, atol=0)


def test_quantize_mixed_dtypes_returns_x_dtype(pair):
    x = randn(7, 33, seed=1, dtype=torch.bfloat16)
    codebook = randn(257, 33, seed=2)
    device_x, device_codebook = pair.to(x, codebook)
    pair.require(device_x, device_codebook)
    quantized, indices = to_cpu(*fastvq.quantize(device_x, device_codebook, backend=pair.backend))
    assert quantized.dtype == torch.bfloat16
    pair.assert_nearest(x, codebook, indices)
    torch.testing.assert_close(quantized, codebook[indices].to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("layout", NON_CONTIGUOUS_LAYOUTS)
def test_quantize_non_contiguous_on_the_device(pair, layout):
    generator = torch.Generator().manual_seed(5)
    codebook = torch.randn(257, 33, generator=generator)
    x = non_contiguous_rows(pair, layout, 300, 33, generator)
    column_major = pair.to(codebook.t().contiguous()).t()
    assert not x.is_contiguous() and not column_major.is_contiguous() and x.shape == (300, 33)
    quantized, indices, _ = to_cpu(*torch.ops.fastvq.quantize(x, column_major, 0.0, 0.0, pair.backend))
    x = x.cpu()
    expected, _ = reference.nearest_code(x, codebook)
    pair.assert_nearest(x, codebook, indices)
    torch.testing.assert_close(indices, expected, rtol=0, atol=0)  # random codes: no near-ties
    torch.testing.assert_close(quantized, codebook[indices], rtol=0, atol=0)


def test_loss_value_matches_reference(pair):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(257, 8, generator=generator)
    codebook = torch.randn(33, 8, generator=generator)
    _, _, loss = torch.ops.fastvq.quantize(*pair.to(x, codebook), 0.25, 1.0, pair.backend)
    _, _, want = reference.quantize(x.double(), codebook.double(), 0.25, 1.0)
    torch.testing.assert_close(loss.cpu().double(), want, **FP32)


# ---- backward through autograd ---------------------------------------------------------------
@pytest.mark.parametrize("commitment_weight,codebook_weight", [(0.25, 0.0), (0.25, 1.0), (0.0, 1.0)])
@pytest.mark.parametrize("num_rows,num_codes,dim", [(1, 1, 1), (33, 3, 3), (300, 257, 33), (1030, 257, 33)])
def test_fused_backward_matches_reference_backward(pair, commitment_weight, codebook_weight, num_rows, num_codes,
                                                   dim):
    skip_if_slow(pair, num_rows, num_codes, dim)
    generator = torch.Generator().manual_seed(num_rows + dim)
    x0 = torch.randn(num_rows, dim, generator=generator)
    e0 = torch.randn(num_codes, dim, generator=generator)
    upstream = torch.randn(num_rows, dim, generator=generator)
    loss_grad = 1.7

    def run(fn, device):
        x = x0.to(device, copy=True).requires_grad_()  # a fresh leaf per run, on any device
        codebook = e0.to(device, copy=True).requires_grad_()
        quantized, indices, loss = fn(x, codebook)
        ((quantized * upstream.to(device)).sum() + loss_grad * loss).backward()
        return to_cpu(quantized, indices, loss, x.grad, codebook.grad)

    got = run(lambda x, e: torch.ops.fastvq.quantize(x, e, commitment_weight, codebook_weight, pair.backend),
              pair.device)
    want = run(lambda x, e: reference.quantize(x, e, commitment_weight, codebook_weight), "cpu")
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)  # well-separated random codes
    for got_value, want_value in zip(got[:1] + got[2:4], want[:1] + want[2:4]):
        torch.testing.assert_close(got_value, want_value.to(got_value.dtype), **FP32)
    if codebook_weight == 0.0:
        assert got[4] is None
    else:
        torch.testing.assert_close(got[4], want[4], **FP32)


# ---- quantize_backward, the op itself --------------------------------------------------------
@pytest.mark.parametrize("reduction,dtype", REDUCTION_DTYPES, ids=REDUCTION_IDS)
@pytest.mark.parametrize("num_rows,num_codes,dim", [(1, 1, 1), (7, 3, 3), (300, 257, 33), (300, 3, 64)])
def test_quantize_backward_matches_reference(pair, monkeypatch, reduction, dtype, num_rows, num_codes, dim):
    skip_reduction_if_redundant(pair, reduction, dtype, num_codes)
    use_reduction(monkeypatch, reduction)
    x = randn(num_rows, dim, seed=dim, dtype=dtype)
    codebook = randn(num_codes, dim, seed=num_codes, dtype=dtype)
    indices = torch.randint(0, num_codes, (num_rows,), generator=torch.Generator().manual_seed(num_rows))
    grad_row = randn(1, dim, seed=7, dtype=dtype)
    grad_q = grad_row.expand(num_rows, dim)  # stride 0, as autograd may pass
    commit_scale, codebook_scale = torch.tensor(0.37), torch.tensor(-1.3)
    device_args = (pair.to(grad_row).expand(num_rows, dim),  # stride 0 on the device too
                   *pair.to(x, codebook, indices, commit_scale, codebook_scale))
    pair.require(*device_args[1:3])
    grad_x, grad_codebook = to_cpu(*torch.ops.fastvq.quantize_backward(*device_args, pair.backend, True))
    want_x, want_codebook = reference.quantize_backward(grad_q, x, codebook, indices, commit_scale, codebook_scale)
    assert grad_x.dtype == grad_codebook.dtype == dtype
    torch.testing.assert_close(grad_x, want_x, **TOLERANCES[dtype])
    torch.testing.assert_close(grad_codebook, want_codebook, **TOLERANCES[dtype])
    if dtype == torch.float32:  # and against float64 arithmetic
        want64_x, want64_codebook = reference.quantize_backward(
            grad_q.double(), x.double(), codebook.double(), indices, commit_scale, codebook_scale)
        torch.testing.assert_close(grad_x.double(), want64_x, **FP32)
        torch.testing.assert_close(grad_codebook.double(), want64_codebook, **FP32)


def test_quantize_backward_without_codebook_gradient(pair):
    x, codebook = randn(300, 33, seed=1), randn(3, 33, seed=2)
    indices = torch.randint(0, 3, (300,), generator=torch.Generator().manual_seed(0))
    scales = torch.tensor(0.5), torch.tensor(2.0)
    device_x, device_codebook, device_indices, *device_scales = pair.to(x, codebook, indices, *scales)
    grad_x, grad_codebook = to_cpu(*torch.ops.fastvq.quantize_backward(
        device_x, device_x, device_codebook, device_indices, *device_scales, pair.backend, False))
    assert grad_codebook.shape == (0,)  # a custom op returns an empty tensor for "not needed"
    torch.testing.assert_close(grad_x, x + 0.5 * (x - codebook[indices]), **FP32)


# ---- the rotation trick: quantize(..., rotation_trick=True) and its fused backward ------------
# Judged against the oracle reference.quantize(..., rotation_trick=True) with autograd (vector-
# quantize-pytorch's formula, not the closed form the kernels implement) and against vqp's own
# rotate_to. The oracle is given the indices the backend chose, once the judge has accepted them
# as nearest: a float32 near-tie may legitimately pick another code, and the backward is tested.
CW, CBW, GRAD_LOSS = 0.25, 1.0, 0.75  # commitment and codebook weights; the loss's upstream gradient


def rotation_run(pair, x, codebook, grad, rotation_trick=True):
    """quantize + backward on the pair: (quantized, indices, grad_x, grad_codebook) on the CPU.
    x and grad are CPU tensors, or views made on the pair's device (kept as they are)."""
    x = pair.to(x).detach().requires_grad_()
    codebook = pair.to(codebook).detach().requires_grad_()
    quantized, indices, loss = torch.ops.fastvq.quantize(x, codebook, CW, CBW, pair.backend, rotation_trick)
    assert quantized.dtype == x.dtype and quantized.shape == x.shape
    torch.autograd.backward((quantized, loss), (pair.to(grad), torch.tensor(GRAD_LOSS, device=pair.device)))
    assert x.grad.dtype == x.dtype and codebook.grad.dtype == codebook.dtype
    return to_cpu(quantized, indices, x.grad, codebook.grad)


def rotation_oracle(x, codebook, grad, indices, rotation_trick=True):
    """(grad_x, grad_codebook) of reference.quantize with autograd, float32 on the CPU, its search
    pinned to `indices` (already judged nearest by the caller)."""
    x, codebook = to_cpu(x, codebook)  # fresh leaves, whatever the caller's tensors were
    x, codebook = x.float().requires_grad_(), codebook.float().requires_grad_()
    with mock.patch.object(reference, "nearest_code", lambda *_: (indices, None)):
        quantized, _, loss = reference.quantize(x, codebook, CW, CBW, rotation_trick=rotation_trick)
    torch.autograd.backward((quantized, loss), (grad.float(), torch.tensor(GRAD_LOSS)))
    return x.grad, codebook.grad


def vqp_grad_x(x, codebook, grad, indices):
    """grad_x from vector-quantize-pytorch's own rotate_to plus the commitment loss, float32."""
    vqp = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    x, codes = to_cpu(x).float().requires_grad_(), codebook.float()[indices]
    commitment = CW * ((x - codes) ** 2).mean()
    torch.autograd.backward((vqp.rotate_to(x, codes), commitment), (grad.float(), torch.tensor(GRAD_LOSS)))
    return x.grad


def assert_rotation_grad_x_close(got, want, x, codebook, indices, dtype):
    """grad_x vs an oracle's in TOLERANCES[dtype], with one error model for degenerate rows.

    The rotation scales a row's gradient by s = ‖q‖/max(‖x‖, ε), so its float32 error is about
    s·u·‖g‖ in every entry, however small the entry. Where ‖x‖ < ε (x = 0, tiny x: the safe
    division, s up to ‖q‖/ε ≈ 1e6) that is far above any fixed atol, so those rows are compared
    divided by s, i.e. relative to their own scale. Every other row is compared as it is."""
    codes = codebook.float()[indices]
    x_norm = x.float().norm(dim=1, keepdim=True)
    s = codes.norm(dim=1, keepdim=True) / x_norm.clamp_min(reference.ROTATION_EPS)
    scale = torch.where(x_norm < reference.ROTATION_EPS, s.clamp_min(1.0), torch.ones_like(s))
    torch.testing.assert_close(got.float() / scale, want / scale, **TOLERANCES[dtype])


def check_rotation_gradients(pair, x, codebook, grad, dtype=torch.float32):
    """The fused op's gradients vs the autograd oracle (and grad_x vs vqp's rotate_to)."""
    quantized, indices, grad_x, grad_codebook = rotation_run(pair, x, codebook, grad)
    x, grad = to_cpu(x, grad)
    pair.assert_nearest(x, codebook, indices)
    want_x, want_codebook = rotation_oracle(x, codebook, grad, indices)
    assert_rotation_grad_x_close(grad_x, want_x, x, codebook, indices, dtype)
    torch.testing.assert_close(grad_codebook.float(), want_codebook, **TOLERANCES[dtype])
    assert_rotation_grad_x_close(grad_x, vqp_grad_x(x, codebook, grad, indices), x, codebook, indices, dtype)
    return quantized, indices, grad_x


ROTATION_SHAPES = [  # (N, K, d): every N in {1, 3, 33, 257, 1030}, K in {1, 3, 257}, d in {1, 3, 33, 64, 130}
    (1, 1, 1), (1, 257, 130), (3, 3, 3), (3, 257, 1), (33, 1, 130), (33, 3, 33), (33, 257, 64),
    (257, 3, 64), (257, 257, 3), (257, 1, 33), (1030, 3, 1), (1030, 1, 3), (1030, 257, 130), (1030, 3, 33),
]


@pytest.mark.parametrize("num_rows,num_codes,dim", ROTATION_SHAPES)
def test_rotation_gradients_match_the_oracle(pair, num_rows, num_codes, dim):
    skip_if_slow(pair, num_rows, num_codes, dim)
    seed = num_rows * 1000 + num_codes * 10 + dim
    x, codebook = randn(num_rows, dim, seed=seed), randn(num_codes, dim, seed=seed + 1)
    quantized, indices, _ = check_rotation_gradients(pair, x, codebook, randn(num_rows, dim, seed=seed + 2))
    assert torch.equal(quantized, codebook[indices])  # no row here has ‖x‖ < ε


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_rotation_non_contiguous_x_and_grad(pair, layout):
    num_rows, dim = 33, 33
    if layout == "transposed":  # made non-contiguous on the device itself
        x, grad = pair.to(randn(dim, num_rows, seed=1)).t(), pair.to(randn(dim, num_rows, seed=2)).t()
    else:
        x = pair.to(randn(2 * num_rows, dim + 7, seed=1))[::2, 3:3 + dim]
        grad = pair.to(randn(num_rows, 2 * dim, seed=2))[:, ::2]
    assert not x.is_contiguous() and not grad.is_contiguous() and x.shape == grad.shape == (num_rows, dim)
    check_rotation_gradients(pair, x, randn(257, dim, seed=3), grad)


def test_rotation_empty_batch(pair):
    codebook = randn(3, 5, seed=0)
    quantized, indices, grad_x, grad_codebook = rotation_run(pair, torch.empty(0, 5), codebook, torch.empty(0, 5))
    assert quantized.shape == grad_x.shape == (0, 5) and indices.shape == (0,)
    assert torch.equal(grad_codebook, torch.zeros_like(codebook))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d).removeprefix("torch."))
def test_rotation_half_inputs(pair, dtype):
    x, codebook = randn(33, 64, seed=4, dtype=dtype), randn(257, 64, seed=5, dtype=dtype)
    pair.require(*pair.to(x, codebook))
    # the oracle runs in float32 on the same rounded inputs; the result is compared in its dtype's tolerance
    check_rotation_gradients(pair, x, codebook, randn(33, 64, seed=6, dtype=dtype), dtype)


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


@pytest.mark.parametrize("dim", [1, 3, 33, 130])
def test_rotation_degenerate_rows(pair, dim):
    x, codebook = degenerate_inputs(dim)
    _, indices, grad_x = check_rotation_gradients(pair, x, codebook, randn(*x.shape, seed=7))
    assert indices[:6].tolist() == [0, 0, 0, 3, 0, 0]
    assert bool(torch.isfinite(grad_x).all())
    assert float(grad_x[0].abs().max()) > 1e4  # x = 0: s = ‖q‖/ε, vqp's huge but finite gradient


def test_rotation_forward_value(pair):
    """quantized is codebook[indices] exactly, except where ‖x‖ < ε: there vqp's rotate_to value
    (x·‖q‖/ε rotated), and 0 for x = 0."""
    vqp = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    x, codebook = degenerate_inputs(33)
    quantized, indices, _, _ = rotation_run(pair, x, codebook, torch.ones_like(x))
    tiny = x.norm(dim=1) < reference.ROTATION_EPS
    assert tiny.tolist()[:6] == [True, True, False, False, False, True] and not tiny[6:].any()
    assert torch.equal(quantized[~tiny], codebook[indices[~tiny]])
    assert torch.equal(quantized[0], torch.zeros(33))
    torch.testing.assert_close(quantized[tiny], vqp.rotate_to(x[tiny], codebook[indices[tiny]]), **FP32)


def test_without_rotation_the_gradient_is_straight_through(pair):
    x, codebook, grad = randn(33, 33, seed=8), randn(257, 33, seed=9), randn(33, 33, seed=10)
    _, indices, grad_x, grad_codebook = rotation_run(pair, x, codebook, grad, rotation_trick=False)
    pair.assert_nearest(x, codebook, indices)
    want_x, want_codebook = rotation_oracle(x, codebook, grad, indices, rotation_trick=False)
    torch.testing.assert_close(grad_x, want_x, **FP32)
    torch.testing.assert_close(grad_codebook, want_codebook, **FP32)
    torch.testing.assert_close(grad_x, grad + CW * GRAD_LOSS * 2 / x.numel() * (x - codebook[indices]), **FP32)


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
    torch.testing.assert_close(one[0], want_x, **FP32)
    torch.testing.assert_close(one[1], want_codebook, **FP32)
    no_grad_x, _ = run(None, 2)  # no upstream gradient: only the commitment term
    torch.testing.assert_close(no_grad_x, 0.5 * (x - codebook[indices]), **FP32)
