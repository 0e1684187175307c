"""nearest_code / quantize / ema_stats on every core backend, against fastvq.reference."""
from __future__ import annotations

import pytest
import torch

import fastvq
from fastvq import reference

from conftest import TOLERANCES, assert_nearest, backend_or_skip, exact_inputs_with_duplicate_codes, exact_sqdist

SHAPES = [  # (N, K, d): every size from the issue appears at least once
    (0, 3, 33),
    (1, 1, 1),
    (1, 1030, 64),
    (7, 3, 3),
    (7, 257, 130),
    (1000, 257, 33),
    (1000, 1030, 3),
    (4099, 3, 64),
    (4099, 1030, 130),
]


def test_cpu_backend_is_built():
    # Every cpu-parametrised test skips without the extension; this one makes that loud.
    assert "cpu" in fastvq.available_backends(), fastvq.unavailable_reasons().get("cpu")


@pytest.mark.parametrize("num_rows,num_codes,dim", SHAPES)
def test_nearest_code_random_inputs_by_distance(backend, num_rows, num_codes, dim):
    generator = torch.Generator().manual_seed(num_rows * 7 + num_codes * 3 + dim)
    x = torch.randn(num_rows, dim, generator=generator)
    codebook = torch.randn(num_codes, dim, generator=generator)
    indices, sqdist = fastvq.nearest_code(x, codebook, backend=backend)
    assert sqdist.dtype == torch.float32 and sqdist.shape == (num_rows,)
    assert_nearest(x, codebook, indices)
    torch.testing.assert_close(sqdist.double(), exact_sqdist(x, codebook, indices), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("num_rows,num_codes,dim", [(1, 1, 1), (7, 3, 3), (1000, 257, 33), (4099, 1030, 64)])
def test_nearest_code_exact_inputs_match_argmin_with_duplicate_codes(backend, num_rows, num_codes, dim):
    x, codebook = exact_inputs_with_duplicate_codes(num_rows, num_codes, dim, seed=num_codes + dim)
    indices, sqdist = fastvq.nearest_code(x, codebook, backend=backend)
    expected_indices, expected_sqdist = reference.nearest_code(x.double(), codebook.double())
    torch.testing.assert_close(indices, expected_indices, rtol=0, atol=0)
    torch.testing.assert_close(sqdist, expected_sqdist, rtol=0, atol=0)


def test_nearest_code_ties_go_to_lowest_index(backend):
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    x = torch.tensor([[0.0, 0.0], [0.5, 0.5], [0.0, 2.0], [2.0, 0.0]])
    indices, _ = fastvq.nearest_code(x, codebook, backend=backend)
    torch.testing.assert_close(indices, torch.argmin(torch.cdist(x.double(), codebook.double()), dim=1))
    assert indices.tolist() == [0, 0, 1, 0]


@pytest.mark.parametrize("layout", ["transposed", "row_step", "column_slice"])
def test_nearest_code_non_contiguous(backend, layout):
    generator = torch.Generator().manual_seed(5)
    codebook = torch.randn(257, 33, generator=generator)
    base = torch.randn(66, 1030, generator=generator)
    x = {
        "transposed": base[:33].t(),
        "row_step": torch.randn(2060, 33, generator=generator)[::2],
        "column_slice": torch.randn(1030, 66, generator=generator)[:, 5:38],
    }[layout]
    assert not x.is_contiguous() and x.shape == (1030, 33)
    indices, sqdist = fastvq.nearest_code(x, codebook, backend=backend)
    expected, _ = fastvq.nearest_code(x.contiguous(), codebook, backend=backend)
    torch.testing.assert_close(indices, expected, rtol=0, atol=0)
    assert_nearest(x, codebook, indices)
    # a non-contiguous codebook too
    wide = torch.randn(257, 66, generator=generator)
    wide[:, ::2] = codebook
    indices_cb, _ = fastvq.nearest_code(x.contiguous(), wide[:, ::2], backend=backend)
    torch.testing.assert_close(indices_cb, expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(0, 8), (5, 0, 8), (3, 8), (2, 7, 8), (1030, 8)])
def test_quantize_shapes_values_and_straight_through_gradient(backend, shape):
    generator = torch.Generator().manual_seed(len(shape))
    codebook = torch.randn(33, 8, generator=generator)
    x = torch.randn(*shape, generator=generator, requires_grad=True)
    quantized, indices = fastvq.quantize(x, codebook, backend=backend)
    assert quantized.shape == x.shape and quantized.dtype == x.dtype and indices.shape == x.shape[:-1]
    torch.testing.assert_close(quantized.detach(), codebook[indices], rtol=0, atol=0)
    upstream = torch.randn(*shape, generator=generator)
    (quantized * upstream).sum().backward()
    torch.testing.assert_close(x.grad, upstream, rtol=0, atol=0)


def test_quantize_sends_no_gradient_to_the_codebook(backend):
    codebook = torch.randn(16, 4, requires_grad=True)
    x = torch.randn(50, 4, requires_grad=True)
    quantized, _ = fastvq.quantize(x, codebook, backend=backend)
    quantized.sum().backward()
    assert codebook.grad is None
    assert x.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_quantize_other_dtypes(backend, dtype):
    generator = torch.Generator().manual_seed(11)
    codebook = torch.randn(257, 33, generator=generator).to(dtype)
    x = torch.randn(300, 33, generator=generator).to(dtype).requires_grad_()
    backend_or_skip(backend, x, codebook)
    quantized, indices = fastvq.quantize(x, codebook, backend=backend)
    assert quantized.dtype == dtype
    torch.testing.assert_close(quantized.detach(), codebook[indices], rtol=0, atol=0)
    assert_nearest(x.detach(), codebook, indices)
    quantized.sum().backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad, torch.ones_like(x), rtol=0, atol=0)


@pytest.mark.parametrize("commitment_weight,codebook_weight", [(0.25, 0.0), (0.25, 1.0), (0.0, 1.0)])
@pytest.mark.parametrize("num_rows,num_codes,dim", [(1, 1, 1), (33, 3, 3), (1030, 257, 33)])
def test_fused_backward_matches_reference_backward(backend, commitment_weight, codebook_weight, num_rows, num_codes, dim):
    generator = torch.Generator().manual_seed(num_rows + dim)
    x0 = torch.randn(num_rows, dim, generator=generator)
    e0 = torch.randn(num_codes, dim, generator=generator)
    upstream = torch.randn(num_rows, dim, generator=generator)
    loss_grad = 1.7

    def run(fn):
        x = x0.clone().requires_grad_()
        codebook = e0.clone().requires_grad_()
        quantized, indices, loss = fn(x, codebook)
        ((quantized * upstream).sum() + loss_grad * loss).backward()
        return quantized.detach(), indices, loss.detach(), x.grad, codebook.grad

    got = run(lambda x, e: torch.ops.fastvq.quantize(x, e, commitment_weight, codebook_weight, backend))
    want = run(lambda x, e: reference.quantize(x, e, commitment_weight, codebook_weight))
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)  # well-separated random codes
    for got_value, want_value in zip(got[:1] + got[2:4], want[:1] + want[2:4]):
        torch.testing.assert_close(got_value, want_value.to(got_value.dtype), **TOLERANCES[torch.float32])
    if codebook_weight == 0.0:
        assert got[4] is None
    else:
        torch.testing.assert_close(got[4], want[4], **TOLERANCES[torch.float32])


@pytest.mark.parametrize("num_rows,num_codes,dim", [(0, 3, 4), (1, 1, 1), (1030, 257, 33), (4099, 3, 130)])
def test_ema_stats_matches_reference(backend, num_rows, num_codes, dim):
    generator = torch.Generator().manual_seed(num_rows + num_codes)
    x = torch.randn(num_rows, dim, generator=generator)
    indices = torch.randint(0, num_codes, (num_rows,), generator=generator)
    counts, sums = fastvq.ema_stats(x, indices, num_codes, backend=backend)
    want_counts, want_sums = reference.ema_stats(x.double(), indices, num_codes)
    assert counts.dtype == sums.dtype == torch.float32
    torch.testing.assert_close(counts.double(), want_counts, rtol=0, atol=0)
    # A float32 sum of n terms errs by at most (n - 1)·u·Σ|x_i| (recursive summation bound).
    _, abs_sums = reference.ema_stats(x.double().abs(), indices, num_codes)
    bound = want_counts.clamp(min=1).unsqueeze(1) * 2.0**-24 * abs_sums
    assert bool(((sums.double() - want_sums).abs() <= bound).all())


def test_loss_value_matches_reference(backend):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(257, 8, generator=generator)
    codebook = torch.randn(33, 8, generator=generator)
    _, _, loss = torch.ops.fastvq.quantize(x, codebook, 0.25, 1.0, backend)
    _, _, want = reference.quantize(x.double(), codebook.double(), 0.25, 1.0)
    torch.testing.assert_close(loss.double(), want, **TOLERANCES[torch.float32])


def test_forced_backend_that_cannot_run_says_why_and_auto_falls_back():
    x = torch.randn(5, 4, dtype=torch.float64)
    codebook = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(fastvq.BackendNotSupportedError, match=r"backend 'cpu' cannot run on these inputs: dtype torch.float64"):
        fastvq.nearest_code(x, codebook, backend="cpu")
    indices, _ = fastvq.nearest_code(x, codebook)  # auto: the torch backend takes float64
    torch.testing.assert_close(indices, reference.nearest_code(x, codebook)[0], rtol=0, atol=0)


def test_environment_variable_overrides_the_backend_argument(monkeypatch):
    x, codebook = torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    monkeypatch.setenv("FASTVQ_BACKEND", "cpu")
    with pytest.raises(fastvq.BackendNotSupportedError, match=r"\$FASTVQ_BACKEND"):
        fastvq.nearest_code(x, codebook, backend="torch")
    monkeypatch.setenv("FASTVQ_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match=r"\$FASTVQ_BACKEND must be 'auto' or one of .*, got 'no-such-backend'"):
        fastvq.nearest_code(x, codebook)
