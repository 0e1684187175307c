"""nearest_code on every (backend, device) pair against fastvq.reference, and how the dispatcher
picks, refuses and overrides a backend.

Random inputs are judged by distance (reference.assert_nearest); small-integer inputs, where
every distance is exact, must match the reference index for index, ties to the lowest index.
"""
from __future__ import annotations

import pytest
import torch

import fastvq
from fastvq import dispatch, reference
from fastvq.numerics import search_centre

from conftest import (NON_CONTIGUOUS_LAYOUTS, TOLERANCES, assert_sqdist, exact_inputs_with_duplicate_codes,
                      non_contiguous_rows, randn, skip_if_slow, small_integers, to_cpu)

SHAPES = [  # (N, K, d): N = 0; 1, 3, 33, 257, 1030 and other odd sizes; K split across threads (20000, 40000)
    (0, 3, 33), (1, 1, 1), (1, 257, 64), (1, 1030, 64), (3, 20000, 5), (7, 1, 64), (7, 3, 3), (7, 257, 33),
    (16, 1030, 64),
    (7, 257, 130), (7, 1030, 64), (40, 40000, 16), (150, 2100, 130), (300, 1, 3), (300, 3, 64), (300, 257, 1),
    (300, 257, 33), (1000, 3, 130), (1000, 257, 33), (1000, 1030, 3), (1000, 1030, 33), (4099, 1, 64),
    (4099, 3, 64), (4099, 257, 3), (4099, 1030, 130),
]
HALF_DTYPES = (torch.bfloat16, torch.float16)


def test_cpu_backend_is_built():
    # Every cpu-parametrised test skips without the extension; this one makes that loud.
    assert "cpu" in fastvq.available_backends(), fastvq.unavailable_reasons().get("cpu")


def search(pair, x, codebook):
    """nearest_code and quantize on the pair's device; (indices, sqdist, quantized) on the CPU."""
    x, codebook = pair.to(x, codebook)
    pair.require(x, codebook)
    indices, sqdist = fastvq.nearest_code(x, codebook, backend=pair.backend)
    quantized, quantize_indices, _ = torch.ops.fastvq.quantize(x, codebook, 0.0, 0.0, pair.backend)
    torch.testing.assert_close(quantize_indices.cpu(), indices.cpu(), rtol=0, atol=0)
    return to_cpu(indices, sqdist, quantized)


# ---- random and exact inputs -----------------------------------------------------------------
@pytest.mark.parametrize("num_rows,num_codes,dim", SHAPES)
def test_nearest_code_random_inputs_by_distance(pair, num_rows, num_codes, dim):
    skip_if_slow(pair, num_rows, num_codes, dim)
    x = randn(num_rows, dim, seed=num_rows * 7 + num_codes * 3 + dim)
    codebook = randn(num_codes, dim, seed=num_codes + 1)
    indices, sqdist, quantized = search(pair, x, codebook)
    assert indices.dtype == torch.int64 and bool(((indices >= 0) & (indices < num_codes)).all())
    pair.assert_nearest(x, codebook, indices)
    assert_sqdist(x, codebook, indices, sqdist)
    assert bool((sqdist >= 0).all())
    torch.testing.assert_close(quantized, codebook[indices], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("num_rows,num_codes,dim", [(7, 3, 3), (300, 257, 33), (300, 3, 64)])
def test_nearest_code_half_inputs_by_distance(pair, dtype, num_rows, num_codes, dim):
    # bf16/fp16 values and their products are exact in float32, so the float32 slack applies.
    x = randn(num_rows, dim, seed=dim, dtype=dtype)
    codebook = randn(num_codes, dim, seed=num_codes + 1, dtype=dtype)
    indices, sqdist, _ = search(pair, x, codebook)
    pair.assert_nearest(x, codebook, indices)
    assert_sqdist(x, codebook, indices, sqdist)


# d = 16 keeps x resident under the interpreter's 32-column cap, so fp16 there takes the tensor-core fold
# (nearest_code.py: improving tiles saved, lowest column found after the loop) across several code tiles.
EXACT_CASES = [((n, k, d), dtype) for n, k, d in [(1, 1, 1), (7, 3, 3), (300, 257, 16), (300, 257, 33),
                                                    (300, 257, 64)]
               for dtype in (torch.float32, *HALF_DTYPES)]
EXACT_CASES += [((1000, 257, 33), torch.float32), ((4099, 1030, 64), torch.float32)]


@pytest.mark.parametrize("shape,dtype", EXACT_CASES, ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple)
                         else str(v).removeprefix("torch."))
def test_nearest_code_exact_inputs_match_argmin_with_duplicate_codes(pair, shape, dtype):
    num_rows, num_codes, dim = shape
    skip_if_slow(pair, num_rows, num_codes, dim)
    x, codebook = exact_inputs_with_duplicate_codes(num_rows, num_codes, dim, seed=num_codes + dim)
    x, codebook = x.to(dtype), codebook.to(dtype)
    expected_indices, expected_sqdist = reference.nearest_code(x.double(), codebook.double())
    indices, sqdist, quantized = search(pair, x, codebook)
    torch.testing.assert_close(indices, expected_indices, rtol=0, atol=0)
    torch.testing.assert_close(sqdist, expected_sqdist.to(sqdist.dtype), rtol=0, atol=0)  # exact integers
    torch.testing.assert_close(quantized, codebook[expected_indices], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", (torch.float32, *HALF_DTYPES), ids=lambda d: str(d).removeprefix("torch."))
def test_nearest_code_ties_inside_a_code_tile_go_to_the_lowest_index(pair, dtype):
    # Copies of a code 8 columns apart (one thread's columns of a row in the tensor cores' accumulator),
    # adjacent (a pair one thread holds), 3 apart, and in a later tile: rows equal to them, and so at
    # distance 0 from every copy, must get the first copy (nearest_code.py's fold, in each of its modes).
    generator = torch.Generator().manual_seed(7)
    codebook = small_integers(200, 16, generator=generator)
    for first, copies in ((2, [10, 18, 130]), (4, [5, 7, 69]), (33, [41, 97])):
        codebook[copies] = codebook[first].clone()
    x = torch.cat([codebook[[2, 10, 18, 130, 4, 5, 7, 69, 33, 41, 97]], small_integers(20, 16, generator=generator)])
    x, codebook = x.to(dtype), codebook.to(dtype)
    expected, _ = reference.nearest_code(x.double(), codebook.double())
    assert expected[:11].tolist() == [2, 2, 2, 2, 4, 4, 4, 4, 33, 33, 33]
    indices, _, _ = search(pair, x, codebook)
    torch.testing.assert_close(indices, expected, rtol=0, atol=0)


def test_nearest_code_codebook_rows_come_back_exactly(pair):
    # faiss's codec round trip: inputs taken from codebook rows must come back as those rows.
    generator = torch.Generator().manual_seed(3)
    codebook = torch.randn(300, 24, generator=generator)
    rows = torch.randint(0, 300, (500,), generator=generator)
    indices, sqdist, quantized = search(pair, codebook[rows], codebook)
    assert torch.equal(indices, rows)
    assert torch.equal(sqdist, torch.zeros(500))
    assert torch.equal(quantized, codebook[rows])


# ---- ties ------------------------------------------------------------------------------------
def test_nearest_code_ties_go_to_lowest_index(pair):
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    x = torch.tensor([[0.0, 0.0], [0.5, 0.5], [0.0, 2.0], [2.0, 0.0]])
    indices, _, _ = search(pair, x, codebook)
    torch.testing.assert_close(indices, torch.argmin(torch.cdist(x.double(), codebook.double()), dim=1))
    assert indices.tolist() == [0, 0, 1, 0]


def test_nearest_code_ties_go_to_lowest_index_across_tiles(pair):
    # 257 codes span several codebook tiles; the nearest code is repeated far apart.
    codebook = 10.0 + torch.arange(257 * 3, dtype=torch.float32).reshape(257, 3)
    target = torch.tensor([1.0, 2.0, 3.0])
    for position in (70, 140, 256):
        codebook[position] = target
    x = torch.stack([target, target + 0.25, torch.zeros(3)])
    indices, _, _ = search(pair, x, codebook)
    assert indices.tolist() == [70, 70, 70]


# ---- memory layouts --------------------------------------------------------------------------
@pytest.mark.parametrize("layout", NON_CONTIGUOUS_LAYOUTS)
def test_nearest_code_non_contiguous(pair, layout):
    skip_if_slow(pair, 1030, 257, 33)
    generator = torch.Generator().manual_seed(5)
    codebook = torch.randn(257, 33, generator=generator)
    x = non_contiguous_rows(pair, layout, 1030, 33, generator)
    device_codebook = pair.to(codebook)
    assert not x.is_contiguous() and x.shape == (1030, 33)
    indices, sqdist = to_cpu(*fastvq.nearest_code(x, device_codebook, backend=pair.backend))
    expected, _ = to_cpu(*fastvq.nearest_code(x.contiguous(), device_codebook, backend=pair.backend))
    torch.testing.assert_close(indices, expected, rtol=0, atol=0)
    pair.assert_nearest(x.cpu(), codebook, indices)
    # a non-contiguous codebook too
    wide = pair.to(torch.randn(257, 66, generator=generator))
    wide[:, ::2] = device_codebook
    indices_cb, _ = fastvq.nearest_code(x.contiguous(), wide[:, ::2], backend=pair.backend)
    torch.testing.assert_close(indices_cb.cpu(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", (torch.float32, *HALF_DTYPES), ids=lambda d: str(d).removeprefix("torch."))
def test_backend_object_nearest_code_dtypes_and_strides(pair, dtype):
    # The backend object itself (what ops.py calls), on a column-major x and with want_quantized off.
    backend = dispatch.get_backend(pair.backend)
    assert backend.unavailable_reason() is None
    x, codebook = exact_inputs_with_duplicate_codes(300, 70, 20, seed=9)
    x_strided = pair.to(x.to(dtype).t().contiguous()).t()  # same values, column-major
    device_codebook = pair.to(codebook.to(dtype))
    pair.require(x_strided, device_codebook)
    indices, sqdist, quantized = to_cpu(*backend.nearest_code(x_strided, device_codebook, want_quantized=True))
    assert indices.dtype == torch.int64 and sqdist.dtype == torch.float32 and quantized.dtype == dtype
    expected, _ = reference.nearest_code(x.double(), codebook.double())
    assert torch.equal(indices, expected)  # small integers are exact in every dtype here
    assert torch.equal(quantized, codebook.to(dtype)[indices])
    assert backend.nearest_code(pair.to(x.to(dtype)), device_codebook, want_quantized=False)[2] is None


# ---- non-finite values -----------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
def test_nearest_code_non_finite_rule(pair):
    codebook = randn(257, 33, seed=3)
    codebook[0, 5] = float("nan")  # never chosen while a finite row exists
    codebook[1, 0] = float("inf")
    codebook[2] = -float("inf")
    x = randn(7, 33, seed=4)
    x[1] = codebook[0].nan_to_num(0.0)  # would be nearest to row 0 without its NaN
    x[2, 3] = float("nan")  # a non-finite row of x gets index 0
    x[3, 0] = float("inf")
    x[4, 1] = -float("inf")
    expected_indices, expected_sqdist = reference.nearest_code(x, codebook)
    indices, sqdist, quantized = search(pair, x, codebook)
    torch.testing.assert_close(indices, expected_indices, rtol=0, atol=0)
    assert indices[2:5].tolist() == [0, 0, 0] and int(indices[1]) > 2
    torch.testing.assert_close(quantized, codebook[expected_indices], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(sqdist, expected_sqdist, equal_nan=True, **TOLERANCES["sqdist"])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
def test_nearest_code_non_finite_values_small(pair):
    # A NaN/inf distance counts as +inf: code 0 (NaN) and code 1 (inf) lose to any finite code.
    codebook = torch.tensor([[float("nan"), 0.0], [float("inf"), 0.0], [5.0, 5.0], [1.0, 1.0]])
    x = torch.tensor([[1.0, 1.0], [float("nan"), 0.0], [0.0, 0.0]])
    indices, sqdist, quantized = search(pair, x, codebook)
    assert indices.tolist() == [3, 0, 3]
    assert sqdist[0] == 0 and torch.isnan(sqdist[1]) and sqdist[2] == 2
    assert torch.equal(quantized[0], codebook[3]) and torch.equal(quantized[2], codebook[3])


def test_nearest_code_every_code_non_finite_gives_index_zero(pair):
    indices, _, _ = search(pair, randn(7, 4, seed=0), torch.full((3, 4), float("nan")))
    assert indices.tolist() == [0] * 7


@pytest.mark.parametrize("num_codes,dim", [(257, 33), (40000, 16)])
def test_nearest_code_a_row_gets_the_same_answer_alone_or_in_a_batch(pair, num_codes, dim):
    # A batch's last tile may hold 1..5 rows (the cpu kernels then compute only those rows): each row's
    # index and sqdist must not depend on the rows searched with it.
    skip_if_slow(pair, 13, num_codes, dim)
    x, codebook = randn(13, dim, seed=num_codes), randn(num_codes, dim, seed=dim)
    all_indices, all_sqdist, _ = search(pair, x, codebook)
    for rows in (slice(0, 1), slice(3, 5), slice(6, 9), slice(1, 6), slice(0, 7)):
        indices, sqdist, _ = search(pair, x[rows], codebook)
        assert torch.equal(indices, all_indices[rows]) and torch.equal(sqdist, all_sqdist[rows]), rows
    pair.assert_nearest(x, codebook, all_indices)


# ---- far from the origin: the centred search frame (issue 12, findings 5 and 6) ----------------
def assert_nearest_centred(x, codebook, indices, precision="ieee"):
    """assert_nearest in the frame centred on search_centre(codebook). Distances are translation
    invariant, so this is the same question with the float32 slack (at ``precision``) of a search done
    in that frame (the plain slack grows with ‖x‖², and at offset 1e4 would accept any code)."""
    centre = search_centre(codebook).double()
    reference.assert_nearest(x.double() - centre, codebook.double() - centre, indices, precision)


@pytest.mark.parametrize("offset", [1e3, 1e4, 1e19])
def test_nearest_code_far_from_the_origin_as_often_right_as_the_reference(pair, offset):
    # x and codes = offset + N(0, 1)·spread, d = 16. Uncentred, the expansion ‖e‖² − 2x·e cancels:
    # 29 % (1e3) and 99.6 % (1e4) wrong codes before the search was centred; the reference has none.
    spread = 1.0 if offset < 1e6 else 1e15  # float32 spacing at 1e19 is about 1e12
    x = offset + spread * randn(1030, 16, seed=1)
    codebook = offset + spread * randn(257, 16, seed=2)
    expected, _ = reference.nearest_code(x, codebook)
    assert_nearest_centred(x, codebook, expected)  # the reference: no wrong code
    indices, sqdist, quantized = search(pair, x, codebook)
    assert_nearest_centred(x, codebook, indices, pair.precision(x, codebook))
    assert_sqdist(x, codebook, indices, sqdist)
    assert torch.equal(quantized, codebook[indices])


def test_nearest_code_exact_inputs_far_from_the_origin(pair):
    # Integers around 2^20: the centred values are small integers, so every distance stays exact.
    x, codebook = exact_inputs_with_duplicate_codes(300, 257, 33, seed=7)
    x, codebook = x + 2.0**20, codebook + 2.0**20
    expected, expected_sqdist = reference.nearest_code(x.double(), codebook.double())
    indices, sqdist, _ = search(pair, x, codebook)
    torch.testing.assert_close(indices, expected, rtol=0, atol=0)
    torch.testing.assert_close(sqdist, expected_sqdist.float(), rtol=0, atol=0)


def test_nearest_code_out_of_float32_range_raises_naming_the_argument(pair):
    # Beyond ‖v − c‖² <= FLT_MAX/8 (c: the centre of the finite codes) a float32 search could overflow.
    codebook = randn(40, 16, seed=3)
    far_code = codebook.clone()
    far_code[7] = 3e37  # finite, but its centred squared norm overflows float32
    with pytest.raises(ValueError, match=r"codebook row 7 is too far from the search centre.*FLT_MAX/8"):
        search(pair, randn(5, 16, seed=4), far_code)
    far_row = randn(5, 16, seed=4)
    far_row[3] = -1e19
    with pytest.raises(ValueError, match=r"x row 3 is too far from the search centre.*FLT_MAX/8"):
        search(pair, far_row, codebook)
    # A non-finite row is no range error: it follows the non-finite rule (index 0).
    far_row[3] = float("inf")
    indices, _, _ = search(pair, far_row, codebook)
    assert int(indices[3]) == 0


def test_search_centre_rule():
    # Per dimension over the finite codes: mean and population std in float64, the mean rounded
    # (half to even) to the power-of-two grid 2^ceil(log2 std); a constant dimension keeps its value.
    codebook = torch.tensor([[1.0, 2.0, 3.0, 0.1], [3.0, 2.0, float("nan"), 0.3], [5.0, 2.0, 4.0, 0.2],
                             [2.5, 2.0, 4.0, 0.2]])
    rows = codebook[[0, 2, 3]].double()  # row 1 holds a NaN: left out of every dimension
    mean, std = rows.mean(0), rows.std(0, correction=0)
    grid = 2.0 ** torch.ceil(torch.log2(std))
    expected = torch.where(std > 0, grid * torch.round(mean / grid), mean).float()
    assert torch.equal(search_centre(codebook), expected)
    assert search_centre(codebook).tolist()[:2] == [2.0, 2.0]  # mean 2.83, std 1.65: grid 2, 2·round(1.42)
    assert torch.equal(search_centre(torch.full((3, 2), float("nan"))), torch.zeros(2))
    assert torch.equal(search_centre(torch.tensor([[1.0], [3.0]])), torch.tensor([2.0]))  # std 1: grid 1


@pytest.mark.parametrize("shape,offset", [((1000, 7), 100.0), ((257, 33), 0.0), ((5000, 16), 1e4), ((3, 1), -7.5)])
def test_cpu_search_centre_matches_the_python_rule(shape, offset):
    from fastvq.backends.cpu import _cpu

    if _cpu is None:
        pytest.skip("fastvq._cpu is not built")
    codebook = offset + 3 * randn(*shape, seed=shape[0])
    codebook[1, 0] = float("inf")
    centre = torch.empty(shape[1])
    _cpu.search_centre(codebook, centre)
    torch.testing.assert_close(centre, search_centre(codebook), rtol=0, atol=0)


# ---- the dispatcher --------------------------------------------------------------------------
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
    # read on every call: blank or unset, the argument applies again at once
    expected = reference.nearest_code(x, codebook)[0]
    for unset in (lambda: monkeypatch.setenv("FASTVQ_BACKEND", "  "), lambda: monkeypatch.delenv("FASTVQ_BACKEND")):
        unset()
        assert torch.equal(fastvq.nearest_code(x, codebook, backend="torch")[0], expected)
    monkeypatch.setenv("FASTVQ_BACKEND", "cpu")
    with pytest.raises(fastvq.BackendNotSupportedError, match=r"\$FASTVQ_BACKEND"):
        fastvq.nearest_code(x, codebook, backend="torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_smoke_torch_backend_dispatches_with_the_right_shapes_and_dtypes(dtype):
    # SMOKE TEST ONLY. The torch backend *is* fastvq.reference, so judging it against the oracle
    # would compare the oracle with itself; it is not a (backend, device) pair. This checks that it
    # dispatches (float64 goes to it under "auto") and returns the contract's shapes and dtypes.
    generator = torch.Generator().manual_seed(11)
    codebook = torch.randn(257, 33, generator=generator).to(dtype)
    x = torch.randn(300, 33, generator=generator).to(dtype).requires_grad_()
    if dtype == torch.float64:
        assert dispatch.resolve("auto", x, codebook).name == "torch"
    indices, sqdist = fastvq.nearest_code(x.detach(), codebook, backend="torch")
    assert indices.dtype == torch.int64 and indices.shape == (300,)
    computed = torch.float64 if dtype == torch.float64 else torch.float32  # float64 stays float64 end to end
    assert sqdist.dtype == computed and sqdist.shape == (300,)
    quantized, quantize_indices = fastvq.quantize(x, codebook, backend="torch")
    assert quantized.dtype == dtype and quantized.shape == x.shape
    torch.testing.assert_close(quantized.detach(), codebook[quantize_indices], rtol=0, atol=0)
    reference.assert_nearest(x.detach(), codebook, quantize_indices)
    quantized.sum().backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad, torch.ones_like(x), rtol=0, atol=0)
    counts, sums = fastvq.ema_stats(x.detach(), indices, 257, backend="torch")
    assert counts.dtype == sums.dtype == computed and counts.shape == (257,) and sums.shape == (257, 33)
