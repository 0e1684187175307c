"""quantize (search + gather + loss, straight-through gradient) and its fused backward
quantize_backward, on every (backend, device) pair against fastvq.reference."""
from __future__ import annotations

import pytest
import torch

import fastvq
from fastvq import reference

from conftest import (REDUCTION_DTYPES, REDUCTION_IDS, TOLERANCES, randn, skip_if_slow,
                      skip_reduction_if_redundant, to_cpu, use_reduction)

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
    reference.assert_nearest(x, codebook, indices)
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
    reference.assert_nearest(x, codebook, indices)
    torch.testing.assert_close(quantized, codebook[indices].to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["transposed", "row_step", "column_slice"])
def test_quantize_non_contiguous_on_the_device(pair, layout):
    generator = torch.Generator().manual_seed(5)
    codebook = torch.randn(257, 33, generator=generator)
    base, view = {
        "transposed": (torch.randn(33, 300, generator=generator), lambda t: t.t()),
        "row_step": (torch.randn(600, 33, generator=generator), lambda t: t[::2]),
        "column_slice": (torch.randn(300, 66, generator=generator), lambda t: t[:, 5:38]),
    }[layout]
    x = view(pair.to(base))  # made non-contiguous on the device itself
    column_major = pair.to(codebook.t().contiguous()).t()
    assert not x.is_contiguous() and not column_major.is_contiguous() and x.shape == (300, 33)
    quantized, indices, _ = to_cpu(*torch.ops.fastvq.quantize(x, column_major, 0.0, 0.0, pair.backend))
    x = x.cpu()
    expected, _ = reference.nearest_code(x, codebook)
    reference.assert_nearest(x, codebook, indices)
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
