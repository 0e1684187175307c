"""Property tests (hypothesis): nearest_code, quantize and the EMA step against fastvq.reference.

Random shapes (N = 0, K = 1 and d = 1 included), memory layouts (transposed, sliced with a step,
made on the device) and dtypes, on every (backend, device) pair but the interpreter's (too slow
for this many examples; the op test files cover it). Two kinds of input:
- exact: small integers, so every distance a float32 kernel computes is exact; the indices must
  equal the reference's, ties to the lowest index, and sqdist must be bitwise equal;
- random: Gaussian values of a drawn magnitude with duplicate codes and near-ties; a chosen code
  is judged by its exact (float64) distance, which may exceed the true minimum only by the
  rounding bound of a float32 evaluation (reference.assert_nearest).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fastvq
from fastvq import FastVectorQuantizer, reference

from conftest import TOLERANCES, assert_sqdist, assert_within_summation_bound, chosen_sqdist, to_cpu

# The kernels' dtypes; float64 runs only on the torch backend, the oracle itself.
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ("contiguous", "transposed", "row_step", "column_step")
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)


@dataclass(frozen=True)
class Case:
    num_rows: int
    num_codes: int
    dim: int
    x_layout: str
    codebook_layout: str
    exact: bool  # small-integer values: exact index equality required
    magnitude: float  # scale of the random values
    seed: int


cases = st.builds(
    Case,
    num_rows=st.one_of(st.just(0), st.integers(0, 40)),
    num_codes=st.one_of(st.just(1), st.integers(1, 24)),
    dim=st.one_of(st.just(1), st.integers(1, 12)),
    x_layout=st.sampled_from(LAYOUTS),
    codebook_layout=st.sampled_from(LAYOUTS),
    exact=st.booleans(),
    magnitude=st.sampled_from([1e-3, 1.0, 300.0]),
    seed=st.integers(0, 2**31 - 1),
)
EDGE_CASES = [
    Case(0, 1, 1, "contiguous", "contiguous", True, 1.0, 0),
    Case(1, 1, 1, "transposed", "row_step", False, 1.0, 1),
    Case(5, 1, 7, "row_step", "column_step", True, 1.0, 2),
    Case(9, 6, 1, "column_step", "transposed", True, 1.0, 3),
    Case(33, 24, 12, "transposed", "transposed", False, 300.0, 4),
]


def with_edge_cases(**other_arguments):
    def decorate(test):
        for case in EDGE_CASES:
            test = example(case=case, **other_arguments)(test)
        return test

    return decorate


def laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout (the result is not contiguous when it can't be)."""
    rows, cols = values.shape
    if layout == "contiguous":
        return values.clone()
    if layout == "transposed":
        return values.t().contiguous().t()
    if layout == "row_step":
        buffer = torch.full((2 * rows, cols), 7.0, dtype=values.dtype, device=values.device)
        buffer[1::2] = values
        return buffer[1::2]
    buffer = torch.full((rows, 2 * cols + 1), 7.0, dtype=values.dtype, device=values.device)
    buffer[:, 1::2] = values
    return buffer[:, 1::2]


def make_inputs(case: Case, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, codebook) built on the CPU, moved to the device and laid out there."""
    generator = torch.Generator().manual_seed(case.seed)
    n, k, d = case.num_rows, case.num_codes, case.dim
    if case.exact:
        codebook = torch.randint(-4, 5, (k, d), generator=generator).float()
        x = torch.randint(-4, 5, (n, d), generator=generator).float()
    else:
        codebook = case.magnitude * torch.randn(k, d, generator=generator)
        x = case.magnitude * torch.randn(n, d, generator=generator)
        # near-ties: some rows sit a hair away from a code
        near = torch.randint(0, k, (n,), generator=generator)
        x[::3] = codebook[near[::3]] + 1e-4 * case.magnitude * torch.randn(x[::3].shape, generator=generator)
    if k > 2:  # a duplicate code: the later copy must never win a tie
        codebook[-1] = codebook[0]
    x, codebook = x.to(dtype).to(device), codebook.to(dtype).to(device)
    return laid_out(x, case.x_layout), laid_out(codebook, case.codebook_layout)


def check_nearest(pair, case: Case, x, codebook, indices, sqdist) -> None:
    x, codebook, indices, sqdist = to_cpu(x, codebook, indices, sqdist)
    assert indices.dtype == torch.int64 and indices.shape == (case.num_rows,)
    assert sqdist.dtype == torch.float32 and sqdist.shape == (case.num_rows,)
    if case.exact:
        want_indices, want_sqdist = reference.nearest_code(x.double(), codebook.double())
        torch.testing.assert_close(indices, want_indices, rtol=0, atol=0)
        torch.testing.assert_close(sqdist, want_sqdist.to(sqdist.dtype), rtol=0, atol=0)  # exact integers
        return
    pair.assert_nearest(x, codebook, indices)
    assert_sqdist(x, codebook, indices, sqdist)  # the chosen code's distance


@pytest.fixture(scope="module")
def backend_name(pair) -> str:
    if pair.interpreted:
        pytest.skip("hypothesis's many examples are too slow for Triton's interpreter; the op test files cover it")
    return pair.backend


@pytest.fixture(scope="module", params=DTYPES, ids=lambda dtype: str(dtype).removeprefix("torch."))
def dtype(request, pair, backend_name) -> torch.dtype:
    pair.require(torch.empty(1, 1, dtype=request.param, device=pair.device))
    return request.param


@PROPERTY_SETTINGS
@with_edge_cases()
@given(case=cases)
def test_nearest_code_property(pair, backend_name, dtype, case):
    x, codebook = make_inputs(case, dtype, pair.device)
    indices, sqdist = fastvq.nearest_code(x, codebook, backend=backend_name)
    check_nearest(pair, case, x, codebook, indices, sqdist)


@PROPERTY_SETTINGS
@with_edge_cases(split=None)
@given(case=cases, split=st.sampled_from([None, 1, 2, 3]))
def test_quantize_property(pair, backend_name, dtype, case, split):
    rows, codebook = make_inputs(case, dtype, pair.device)
    # (N, d) or (a, N/a, d): a view of the same, possibly non-contiguous, memory
    x = rows if split is None or case.num_rows % split else rows.unflatten(0, (split, case.num_rows // split))
    x = x.detach().requires_grad_()
    codebook.requires_grad_()
    quantized, indices = fastvq.quantize(x, codebook, backend=backend_name)
    assert quantized.shape == x.shape and quantized.dtype == dtype and indices.shape == x.shape[:-1]
    torch.testing.assert_close(quantized.detach(), codebook.detach()[indices], rtol=0, atol=0)
    flat_indices = indices.reshape(-1)
    sqdist = chosen_sqdist(rows, codebook, flat_indices).float()
    check_nearest(pair, case, rows, codebook, flat_indices, sqdist)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(case.seed)).to(dtype).to(pair.device)
    (quantized * upstream).sum().backward()
    torch.testing.assert_close(x.grad, upstream, rtol=0, atol=0)  # straight through, exactly
    assert codebook.grad is None  # the codebook learns only through a loss term


@PROPERTY_SETTINGS
@with_edge_cases(weights=(0.25, 1.0))
@given(case=cases, weights=st.sampled_from([(0.25, 0.0), (0.25, 1.0), (0.0, 1.0)]))
def test_fused_quantize_loss_and_backward_property(pair, backend_name, dtype, case, weights):
    commitment_weight, codebook_weight = weights
    x, codebook = make_inputs(case, dtype, pair.device)
    x.requires_grad_()
    codebook.requires_grad_()
    quantized, indices, loss = torch.ops.fastvq.quantize(x, codebook, commitment_weight, codebook_weight,
                                                         backend_name)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(case.seed)).to(dtype)
    ((quantized * upstream.to(pair.device)).sum() + 1.5 * loss).backward()
    x0, e0, indices, loss = to_cpu(x, codebook, indices, loss)
    check_nearest(pair, case, x0, e0, indices, chosen_sqdist(x0, e0, indices).float())
    # expected values from the backend's own indices, so a legitimate near-tie swap is no error
    total = chosen_sqdist(x0, e0, indices).sum()
    expected_loss = (commitment_weight + codebook_weight) * total / max(case.num_rows * case.dim, 1)
    torch.testing.assert_close(loss.double(), expected_loss, **TOLERANCES[torch.float32])
    scale = torch.tensor(1.5 * 2.0 / max(case.num_rows * case.dim, 1))
    want_grad_x, want_grad_codebook = reference.quantize_backward(
        upstream.double(), x0.double(), e0.double(), indices, scale * commitment_weight, scale * codebook_weight
    )
    tolerance = TOLERANCES[dtype]
    magnitude = max(1.0, float(torch.cat([x0.flatten(), e0.flatten()]).double().abs().max()))
    tolerance = dict(rtol=tolerance["rtol"], atol=tolerance["atol"] * magnitude)
    torch.testing.assert_close(x.grad.cpu().double(), want_grad_x, **tolerance)
    if codebook_weight == 0.0:
        assert codebook.grad is None
    else:
        torch.testing.assert_close(codebook.grad.cpu().double(), want_grad_codebook, **tolerance)


@PROPERTY_SETTINGS
@with_edge_cases()
@given(case=cases)
def test_ema_stats_property(pair, backend_name, dtype, case):
    x, _ = make_inputs(case, dtype, pair.device)
    generator = torch.Generator().manual_seed(case.seed + 1)
    indices = torch.randint(0, case.num_codes, (case.num_rows,), generator=generator)
    counts, sums = to_cpu(*fastvq.ema_stats(x, indices.to(pair.device), case.num_codes, backend=backend_name))
    x = x.cpu()
    want_counts, _ = reference.ema_stats(x.double(), indices, case.num_codes)
    assert counts.dtype == sums.dtype == torch.float32 and sums.shape == (case.num_codes, case.dim)
    torch.testing.assert_close(counts.double(), want_counts, rtol=0, atol=0)
    # a float32 sum of n terms errs by at most n·u·Σ|x_i|; small integers sum exactly
    assert_within_summation_bound(sums, x, indices, case.num_codes, exact=case.exact)


@PROPERTY_SETTINGS
@with_edge_cases(decay=0.5)
@with_edge_cases(decay=0.0)  # with N = 0 every smoothed count is 0: codes must keep their values
@given(case=cases, decay=st.sampled_from([0.0, 0.5, 0.99]))
def test_ema_training_step_property(pair, backend_name, dtype, case, decay):
    x, codebook = make_inputs(case, dtype, pair.device)
    module = FastVectorQuantizer(case.dim, case.num_codes, decay=decay, commitment_weight=0.25, rotation_trick=False,
                                 backend=backend_name).train().to(pair.device)
    module.set_codebook(codebook.float())
    names = ("cluster_size", "embed_avg", "embed")
    state = {name: getattr(module._codebook, name)[0].detach().cpu().clone() for name in names}  # one codebook
    quantized, indices, loss = to_cpu(*module(x))
    x, codebook = to_cpu(x, codebook.float())
    x0 = x.double()
    check_nearest(pair, case, x, codebook, indices, chosen_sqdist(x, codebook, indices).float())
    torch.testing.assert_close(quantized, codebook[indices].to(dtype), rtol=0, atol=0)
    # the expected step, from the indices the module chose (a near-tie may legitimately differ)
    counts, sums = reference.ema_stats(x0, indices, case.num_codes)
    reference.ema_update(state["embed"], state["cluster_size"], state["embed_avg"], counts, sums, decay, module.eps)
    exactness = dict(rtol=0, atol=0) if case.exact else TOLERANCES[torch.float32]
    for name in names:
        scale = 1.0 if case.exact else max(1.0, float(state[name].abs().max()))
        tolerance = exactness if case.exact else dict(rtol=exactness["rtol"], atol=exactness["atol"] * scale)
        torch.testing.assert_close(getattr(module._codebook, name)[0].cpu(), state[name], **tolerance,
                                   msg=lambda m: f"{name}: {m}")
    expected_loss = 0.25 * chosen_sqdist(x, codebook, indices).sum() / max(case.num_rows * case.dim, 1)
    torch.testing.assert_close(loss.double(), expected_loss, **TOLERANCES[torch.float32])
