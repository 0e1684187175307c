"""nearest_codes (top-k) on every (backend, device) pair against fastvq.reference.

Random inputs are judged by distance, position by position (reference.assert_nearest_k, on the same
float32 slack as nearest_code); small-integer inputs, where every distance is exact, must match the
reference list index for index, ties to the lower index.
"""
from __future__ import annotations

import pytest
import torch

import fastvq
from fastvq import dispatch, ops, reference
from fastvq.numerics import search_centre

from conftest import (NON_CONTIGUOUS_LAYOUTS, TOLERANCES, exact_inputs_with_duplicate_codes, non_contiguous_rows,
                      randn, skip_if_slow, to_cpu)

SHAPES = [  # (N, K, d): N in 1, 3, 33, 257, 1030; K = 1 and 257 among others; d in 1, 3, 33 and a wide one
    (1, 1, 1), (1, 257, 33), (3, 3, 3), (3, 1030, 1), (33, 1, 33), (33, 257, 3), (33, 65, 130),
    (257, 257, 1), (257, 70, 33), (257, 1030, 3), (1030, 257, 33), (1030, 64, 16), (1030, 1, 3),
]


def search_k(pair, x, codebook, k):
    """nearest_codes on the pair's device; (indices, sqdist) on the CPU."""
    x, codebook = pair.to(x, codebook)
    pair.require(x, codebook, op="nearest_codes")
    return to_cpu(*fastvq.nearest_codes(x, codebook, k, backend=pair.backend))


def ks_for(num_codes):
    return sorted({1, min(num_codes, 8), min(num_codes, 64)})


def assert_sqdist_k(x, codebook, indices, sqdist):
    """sqdist (N, k) float32 is each listed code's distance, within TOLERANCES["sqdist"]."""
    assert sqdist.dtype == torch.float32 and sqdist.shape == indices.shape
    x64, e64 = x.double(), codebook.double()
    expected = ((x64[:, None, :] - e64[indices]) ** 2).sum(-1)
    torch.testing.assert_close(sqdist.double(), expected, **TOLERANCES["sqdist"])


# ---- random and exact inputs -----------------------------------------------------------------
@pytest.mark.parametrize("num_rows,num_codes,dim", SHAPES)
def test_nearest_codes_random_inputs_by_distance(pair, num_rows, num_codes, dim):
    skip_if_slow(pair, num_rows, num_codes, dim)
    x = randn(num_rows, dim, seed=num_rows * 7 + num_codes * 3 + dim)
    codebook = randn(num_codes, dim, seed=num_codes + 1)
    for k in ks_for(num_codes):
        indices, sqdist = search_k(pair, x, codebook, k)
        assert indices.dtype == torch.int64 and indices.shape == (num_rows, k)
        pair.assert_nearest_k(x, codebook, indices)
        assert_sqdist_k(x, codebook, indices, sqdist)


@pytest.mark.parametrize("num_rows,num_codes,dim", [(257, 257, 33), (1030, 70, 3), (3, 1030, 16), (40, 40000, 4)])
def test_nearest_codes_exact_inputs_match_the_reference_with_ties_to_the_lower_index(pair, num_rows, num_codes,
                                                                                      dim):
    skip_if_slow(pair, num_rows, num_codes, dim)
    # Small integers in few dimensions: many codes share a distance, and duplicate codes tie exactly
    # (at K = 40000 across the chunks the cpu kernel splits the codes into for two threads).
    x, codebook = exact_inputs_with_duplicate_codes(num_rows, num_codes, dim, seed=num_codes + dim)
    for k in ks_for(num_codes):
        expected, expected_sqdist = reference.nearest_codes(x.double(), codebook.double(), k)
        indices, sqdist = search_k(pair, x, codebook, k)
        torch.testing.assert_close(indices, expected, rtol=0, atol=0)
        torch.testing.assert_close(sqdist, expected_sqdist.float(), rtol=0, atol=0)  # exact integers


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=lambda d: str(d).removeprefix("torch."))
def test_nearest_codes_half_inputs(pair, dtype):
    x, codebook = randn(300, 33, seed=1, dtype=dtype), randn(257, 33, seed=2, dtype=dtype)
    indices, sqdist = search_k(pair, x, codebook, 8)
    pair.assert_nearest_k(x, codebook, indices)
    assert_sqdist_k(x.float(), codebook.float(), indices, sqdist)


def test_nearest_codes_k1_equals_nearest_code(pair):
    x, codebook = randn(1030, 33, seed=5), randn(257, 33, seed=6)
    skip_if_slow(pair, 1030, 257, 33)
    indices, sqdist = search_k(pair, x, codebook, 1)
    device_x, device_codebook = pair.to(x, codebook)
    one_index, one_sqdist = to_cpu(*fastvq.nearest_code(device_x, device_codebook, backend=pair.backend))
    torch.testing.assert_close(indices[:, 0], one_index, rtol=0, atol=0)
    torch.testing.assert_close(sqdist[:, 0], one_sqdist, **TOLERANCES["sqdist"])


def test_nearest_codes_ties_go_to_the_lower_index_across_tiles(pair):
    # 257 codes span several codebook tiles; the nearest code is repeated far apart.
    codebook = 10.0 + torch.arange(257 * 3, dtype=torch.float32).reshape(257, 3)
    target = torch.tensor([1.0, 2.0, 3.0])
    for position in (200, 70, 256, 140):
        codebook[position] = target
    x = torch.stack([target, target + 0.25, torch.zeros(3)])
    indices, sqdist = search_k(pair, x, codebook, 5)
    assert indices[:, :4].tolist() == [[70, 140, 200, 256]] * 3
    assert indices[:, 4].tolist() == [0, 0, 0]  # the next nearest: code 0 = (10, 11, 12)
    assert sqdist[0, :4].tolist() == [0.0] * 4


def test_nearest_codes_codebook_rows_come_back_first(pair):
    generator = torch.Generator().manual_seed(3)
    codebook = torch.randn(300, 24, generator=generator)
    rows = torch.randint(0, 300, (500,), generator=generator)
    indices, sqdist = search_k(pair, codebook[rows], codebook, 4)
    assert torch.equal(indices[:, 0], rows)
    assert torch.equal(sqdist[:, 0], torch.zeros(500))


def test_nearest_codes_n0(pair):
    x, codebook = torch.empty(0, 33), randn(257, 33, seed=0)
    indices, sqdist = search_k(pair, x, codebook, 7)
    assert indices.shape == sqdist.shape == (0, 7)
    assert indices.dtype == torch.int64 and sqdist.dtype == torch.float32


@pytest.mark.parametrize("num_rows,num_codes,dim", [(1030, 257, 33), (40, 40000, 16)])
def test_nearest_codes_identical_for_any_thread_count(pair, num_rows, num_codes, dim):
    # (40, 40000, 16) splits the codes across threads (few row groups), (1030, 257, 33) the rows.
    skip_if_slow(pair, num_rows, num_codes, dim)
    x, codebook = randn(num_rows, dim, seed=8), randn(num_codes, dim, seed=9)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(search_k(pair, x, codebook, 8))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    pair.assert_nearest_k(x, codebook, results[0][0])


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_nearest_codes_far_from_the_origin(pair, offset):
    # As nearest_code's test: judged in the frame centred on search_centre (translation invariant).
    x, codebook = offset + randn(300, 16, seed=1), offset + randn(257, 16, seed=2)
    indices, sqdist = search_k(pair, x, codebook, 8)
    centre = search_centre(codebook).double()
    reference.assert_nearest_k(x.double() - centre, codebook.double() - centre, indices, pair.precision(x, codebook))
    assert_sqdist_k(x, codebook, indices, sqdist)


def test_nearest_codes_out_of_float32_range_raises_naming_the_argument(pair):
    codebook = randn(40, 16, seed=3)
    far_code = codebook.clone()
    far_code[7] = 3e37
    with pytest.raises(ValueError, match=r"codebook row 7 is too far from the search centre.*FLT_MAX/8"):
        search_k(pair, randn(5, 16, seed=4), far_code, 3)
    far_row = randn(5, 16, seed=4)
    far_row[3] = -1e19
    with pytest.raises(ValueError, match=r"x row 3 is too far from the search centre.*FLT_MAX/8"):
        search_k(pair, far_row, codebook, 3)


# ---- memory layouts --------------------------------------------------------------------------
@pytest.mark.parametrize("layout", NON_CONTIGUOUS_LAYOUTS)
def test_nearest_codes_non_contiguous(pair, layout):
    skip_if_slow(pair, 1030, 257, 33)
    generator = torch.Generator().manual_seed(5)
    codebook = torch.randn(257, 33, generator=generator)
    x = non_contiguous_rows(pair, layout, 1030, 33, generator)
    device_codebook = pair.to(codebook)
    pair.require(x, device_codebook, op="nearest_codes")
    assert not x.is_contiguous() and x.shape == (1030, 33)
    indices, sqdist = to_cpu(*fastvq.nearest_codes(x, device_codebook, 8, backend=pair.backend))
    expected, expected_sqdist = to_cpu(*fastvq.nearest_codes(x.contiguous(), device_codebook, 8,
                                                            backend=pair.backend))
    torch.testing.assert_close(indices, expected, rtol=0, atol=0)
    torch.testing.assert_close(sqdist, expected_sqdist, rtol=0, atol=0)
    pair.assert_nearest_k(x.cpu(), codebook, indices)
    wide = pair.to(torch.randn(257, 66, generator=generator))
    wide[:, ::2] = device_codebook
    assert not wide[:, ::2].is_contiguous()
    indices_cb, _ = fastvq.nearest_codes(x.contiguous(), wide[:, ::2], 8, backend=pair.backend)
    torch.testing.assert_close(indices_cb.cpu(), expected, rtol=0, atol=0)


# ---- non-finite values -----------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
def test_nearest_codes_non_finite_rule(pair):
    # A NaN/inf distance counts as +inf: such codes come after every finite one, in index order.
    codebook = torch.tensor([[float("nan"), 0.0], [float("inf"), 0.0], [5.0, 5.0], [1.0, 1.0], [2.0, 2.0]])
    x = torch.tensor([[1.0, 1.0], [float("nan"), 0.0], [0.0, 0.0]])
    indices, sqdist = search_k(pair, x, codebook, 5)
    assert indices.tolist() == [[3, 4, 2, 0, 1], [0, 1, 2, 3, 4], [3, 4, 2, 0, 1]]
    expected, expected_sqdist = reference.nearest_codes(x, codebook, 5)
    assert torch.equal(indices, expected)
    torch.testing.assert_close(sqdist, expected_sqdist, equal_nan=True, **TOLERANCES["sqdist"])


# ---- arguments, the op, the oracle and the judge ---------------------------------------------
@pytest.mark.parametrize("k,error,message", [
    (0, ValueError, r"k must be a positive int, got 0"),
    (-2, ValueError, r"k must be a positive int, got -2"),
    (65, ValueError, r"k must be at most min\(K, 64\) = 64 for a codebook of shape \(100, 4\), got 65"),
    (2.0, TypeError, r"k must be an int, got float"),
    (True, TypeError, r"k must be an int, got bool"),
])
def test_nearest_codes_bad_k(k, error, message):
    with pytest.raises(error, match=message):
        fastvq.nearest_codes(torch.randn(5, 4), torch.randn(100, 4), k)


def test_nearest_codes_k_above_the_codebook_size_and_bad_shapes():
    with pytest.raises(ValueError, match=r"k must be at most min\(K, 64\) = 3 for a codebook of shape \(3, 4\), got 4"):
        fastvq.nearest_codes(torch.randn(5, 4), torch.randn(3, 4), 4)
    with pytest.raises(ValueError, match=r"x must have shape \(N, d\) with d == codebook.shape\[1\] == 4"):
        fastvq.nearest_codes(torch.randn(5, 3), torch.randn(3, 4), 1)
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of"):
        fastvq.nearest_codes(torch.randn(5, 4), torch.randn(3, 4), 1, backend="gpu")


def test_nearest_codes_opcheck():
    x, codebook = randn(33, 8, seed=0), randn(70, 8, seed=1)
    torch.library.opcheck(ops.nearest_codes, (x, codebook, 5, "auto"))
    torch.library.opcheck(ops.nearest_codes, (x.t().contiguous().t(), codebook[::2], 3, "auto"))


def test_nearest_codes_traces_under_torch_compile():
    x, codebook = randn(33, 8, seed=0), randn(70, 8, seed=1)
    compiled = torch.compile(lambda a, b: fastvq.nearest_codes(a, b, 4), fullgraph=True, backend="eager")
    indices, _ = compiled(x, codebook)
    torch.testing.assert_close(indices, fastvq.nearest_codes(x, codebook, 4)[0], rtol=0, atol=0)


def test_reference_nearest_codes_agrees_with_topk_of_reference_distances():
    # Random float64 data has no ties, so torch.topk's (unstable) order is the order.
    x, codebook = randn(257, 33, seed=1, dtype=torch.float64), randn(1030, 33, seed=2, dtype=torch.float64)
    values, expected = torch.topk(reference.pairwise_sqdist(x, codebook), 64, dim=1, largest=False)
    indices, sqdist = reference.nearest_codes(x, codebook, 64)
    assert torch.equal(indices, expected)
    torch.testing.assert_close(sqdist, values, **TOLERANCES["float64_roundings"])
    assert torch.equal(reference.nearest_codes(x, codebook, 1)[0][:, 0], reference.nearest_code(x, codebook)[0])


def test_assert_nearest_k_rejects_wrong_lists():
    x, codebook = randn(40, 6, seed=3), randn(50, 6, seed=4)
    indices, _ = reference.nearest_codes(x, codebook, 5)
    reference.assert_nearest_k(x, codebook, indices)
    with pytest.raises(AssertionError, match=r"row 0, position 0"):
        reference.assert_nearest_k(x, codebook, indices.flip(1))  # farthest of the five first
    skipped = indices.clone()
    skipped[7, 2] = reference.nearest_codes(x, codebook, 50)[0][7, 30]  # a far code in the list
    with pytest.raises(AssertionError, match=r"row 7, position 2"):
        reference.assert_nearest_k(x, codebook, skipped)
    twice = indices.clone()
    twice[3, 4] = twice[3, 1]
    with pytest.raises(AssertionError, match=r"row 3 lists a code twice"):
        reference.assert_nearest_k(x, codebook, twice)


def test_smoke_torch_backend_and_the_stated_fallbacks():
    # SMOKE TEST ONLY: the torch backend is the oracle. It takes float64 under "auto" and keeps it.
    x, codebook = randn(30, 5, seed=0, dtype=torch.float64), randn(20, 5, seed=1, dtype=torch.float64)
    assert dispatch.resolve("auto", x, codebook, op="nearest_codes").name == "torch"
    indices, sqdist = fastvq.nearest_codes(x, codebook, 3)
    assert indices.shape == sqdist.shape == (30, 3) and sqdist.dtype == torch.float64
    # The CUDA C++ backend runs the oracle for nearest_codes, and says so.
    assert "reference" in dispatch.get_backend("cuda").op_fallbacks()["nearest_codes"]
