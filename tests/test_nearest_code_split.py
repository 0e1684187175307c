"""The Triton search split over code ranges (fastvq/triton/nearest_code_split.py): the dispatcher's
rule, and the split path against fastvq.reference.

The rule only picks the split for few rows and K >= 2048, sizes the interpreter cannot afford, so
the triton pairs here force it (``pair`` below), and the shared bodies of test_nearest_code.py
imported here run through the split kernels: on CUDA tensors, and on CPU tensors in the
TRITON_INTERPRET=1 process of test_triton_interpreter.py. Under the interpreter (64-code tiles) a
code range is one to a few tiles, so K = 257 has 5 ranges and K = 1030 has 17.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import fastvq  # noqa: E402
from fastvq import reference  # noqa: E402
from fastvq.triton import nearest_code_split as split  # noqa: E402
from fastvq.triton import _score_tile  # noqa: E402

from conftest import TOLERANCES, TRITON_PAIRS, _in_default_mode, non_contiguous_rows, randn, to_cpu  # noqa: E402
from test_nearest_code import (  # noqa: E402,F401  (shared bodies, collected here with the forced split)
    test_backend_object_nearest_code_dtypes_and_strides, test_nearest_code_codebook_rows_come_back_exactly,
    test_nearest_code_every_code_non_finite_gives_index_zero, test_nearest_code_exact_inputs_far_from_the_origin,
    test_nearest_code_exact_inputs_match_argmin_with_duplicate_codes, test_nearest_code_non_finite_rule,
    test_nearest_code_non_finite_values_small, test_nearest_code_out_of_float32_range_raises_naming_the_argument,
    test_nearest_code_random_inputs_by_distance, test_nearest_code_ties_go_to_lowest_index,
    test_nearest_code_ties_go_to_lowest_index_across_tiles)

H200_SMS = 132

calls = {"split": 0}


@pytest.fixture(scope="module", params=TRITON_PAIRS, ids=str)
def pair(request):
    """The triton pairs, with every search of N >= 1 rows sent down the split path (and counted)."""
    run_split = split.nearest_code_split

    def counted(*args, **kwargs):
        calls["split"] += 1
        return run_split(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(split, "use_split", lambda num_rows, num_codes, sms: True)
        patch.setattr(split, "nearest_code_split", counted)
        yield from _in_default_mode(request)


def raw(pair, x, codebook, want_quantized=True):
    """torch.ops.fastvq.triton_nearest_code on the pair's device; results on the CPU."""
    return to_cpu(*torch.ops.fastvq.triton_nearest_code(*pair.to(x, codebook), want_quantized))


# ---- the dispatcher's rule and grid ----------------------------------------------------------
def test_rule_splits_only_when_row_blocks_cannot_fill_the_sms():
    assert split.use_split(256, 65536, H200_SMS)
    assert split.use_split(2112, 2048, H200_SMS)  # 66 blocks of 32 rows: half of 132 SMs
    assert not split.use_split(2113, 65536, H200_SMS)
    assert not split.use_split(256, 2047, H200_SMS)  # too few codes to share out
    assert split.use_split(256, split.MAX_CODES, H200_SMS)
    assert not split.use_split(256, split.MAX_CODES + 1, H200_SMS)  # int32 code offsets, K padded
    assert not split.use_split(65536, 65536, H200_SMS)


def test_grid_fills_an_h200_at_256_rows_and_65536_codes():
    for config in [*split._CONFIGS, _score_tile.DETERMINISTIC_CONFIG, _score_tile.DETERMINISTIC_CONFIG_FP32]:
        block_n, block_k = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
        ranges = split.code_ranges(256, 65536, H200_SMS, block_n, block_k)
        programs = triton.cdiv(256, block_n) * ranges
        assert programs >= 2 * H200_SMS and ranges <= 65536 // block_k, (block_n, block_k, ranges)
    assert split.code_ranges(1, 100, H200_SMS, 64, 64) == 2  # never more ranges than code tiles
    assert split.code_ranges(2112, 65536, H200_SMS, 32, 64) == 4  # 66 row blocks × 4 = 264


@pytest.mark.parametrize("num_rows,kernel_name", [(256, "_split_search_kernel"), (4096, "_nearest_code_kernel")])
def test_launcher_takes_the_split_path_for_few_rows(monkeypatch, num_rows, kernel_name):
    # What triton_nearest_code would launch first on 132 SMs (CPU tensors use STAND_IN_SM_COUNT), and
    # its grid, at the fixed config of deterministic mode.
    from fastvq.triton import _jit, nearest_code

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FASTVQ_DETERMINISTIC", "1")
    assert split.STAND_IN_SM_COUNT == H200_SMS
    x, codebook = randn(num_rows, 64, seed=0, dtype=torch.bfloat16), randn(65536, 64, seed=1, dtype=torch.bfloat16)
    with _jit.capture_launches(), pytest.raises(_jit.Captured) as caught:
        nearest_code.triton_nearest_code(x, codebook, True)
    launched = caught.value
    assert launched.kernel.fn.__name__ == kernel_name
    grid = launched.grid(launched.kwargs)
    if kernel_name == "_split_search_kernel":
        assert grid == (4, 66) and launched.args[4].dtype == torch.int64  # 264 programs; the keys
        assert launched.kwargs["BLOCK_N"] == _score_tile.DETERMINISTIC_CONFIG.kwargs["BLOCK_N"]
    else:
        assert len(grid) == 1


def test_split_search_compiles_at_one_row_one_code_one_dim(monkeypatch):
    # A compiled launch makes integers equal to 1 (N, K, d) constants, which the interpreter never does.
    from fastvq.triton import compile_check, nearest_code

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FASTVQ_DETERMINISTIC", "1")
    monkeypatch.setattr(split, "use_split", lambda num_rows, num_codes, sms: True)
    captured = compile_check.capture(lambda: nearest_code.triton_nearest_code(torch.ones(1, 1), torch.ones(1, 1), True))
    assert captured.kernel.fn.__name__ == "_split_search_kernel"
    compile_check.compile_launch(captured, 90, {})


def test_aot_autograd_traces_into_both_split_kernels(monkeypatch):
    # What torch.compile sees of the split path (test_triton.py has the unsplit one): two kernel nodes,
    # the search (whose autotuner restores the keys between trials) and the epilogue. Nothing runs.
    from functorch.compile import aot_function

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(split, "use_split", lambda num_rows, num_codes, sms: True)
    graphs = []

    class Traced(Exception):
        pass

    def capture(graph_module, example_inputs):
        graphs.append(graph_module.code)
        raise Traced

    with pytest.raises(Traced):
        aot_function(lambda a, b: torch.ops.fastvq.triton_nearest_code(a, b, True), fw_compiler=capture)(
            randn(7, 3, seed=0), randn(5, 3, seed=1))
    assert graphs[0].count("triton_kernel_wrapper_functional(") == 2, graphs[0]
    assert "'keys_ptr'" in graphs[0] and "fastvq.triton_nearest_code" not in graphs[0]


# ---- the split path against the reference ----------------------------------------------------
def test_forced_split_runs_the_split_kernels(pair):
    before = calls["split"]
    x, codebook = randn(3, 5, seed=0), randn(257, 5, seed=1)
    indices, _, _, _ = raw(pair, x, codebook)
    assert calls["split"] == before + 1
    pair.assert_nearest(x, codebook, indices)


def tie_inputs(num_rows: int, num_codes: int, dim: int, seed: int):
    """Integer codes on a grid of 10 (distinct codes are >= 10 apart) and rows x whose nearest codes
    tie across code ranges: x = e_p + u (u a unit vector) with e_q = e_p + 2u for a later q, so
    ‖x − e_p‖² = ‖x − e_q‖² = 1 and p must win; or x = e_q exactly, where the later range wins on score."""
    generator = torch.Generator().manual_seed(seed)
    codebook = 10.0 * torch.randint(-12, 13, (num_codes, dim), generator=generator).float()
    x = torch.empty(num_rows, dim)
    for row in range(num_rows):
        p = int(torch.randint(0, num_codes - 1, (1,), generator=generator))
        q = int(torch.randint(p + 1, num_codes, (1,), generator=generator))
        unit = torch.zeros(dim)
        unit[row % dim] = 1.0 if row % 4 else -1.0
        codebook[q] = codebook[p] + 2 * unit
        x[row] = codebook[q] if row % 3 == 2 else codebook[p] + unit
    return x, codebook


@pytest.mark.parametrize("num_rows", [1, 3, 33])
@pytest.mark.parametrize("num_codes", [257, 1030])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_exact_ties_across_code_ranges_go_to_the_lowest_index(pair, num_rows, num_codes, dtype):
    x, codebook = tie_inputs(num_rows, num_codes, 5, seed=num_rows + num_codes)
    x, codebook = x.to(dtype), codebook.to(dtype)  # |values| <= 122, also centred: exact in bfloat16
    expected, expected_sqdist = reference.nearest_code(x.double(), codebook.double())
    indices, sqdist, quantized, range_check = raw(pair, x, codebook)
    assert torch.equal(indices, expected)
    assert torch.equal(sqdist, expected_sqdist.float())
    assert torch.equal(quantized, codebook[expected])
    assert range_check.tolist() == [num_codes, num_rows]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
def test_non_finite_rows_and_a_non_finite_first_range(pair):
    # Codes 0..99 (the first ranges) are NaN or inf: a range with no finite score offers (+inf, 0),
    # which must lose to any finite code elsewhere; a row of x with a NaN/inf still gets index 0.
    codebook = randn(1030, 9, seed=2)
    codebook[:100:2, 3] = float("nan")
    codebook[1:100:2, 0] = float("inf")
    x = randn(33, 9, seed=3)
    x[4, 2] = float("nan")
    x[17, 8] = -float("inf")
    x[20] = codebook[50].nan_to_num(0.0)
    expected, expected_sqdist = reference.nearest_code(x, codebook)
    indices, sqdist, quantized, _ = raw(pair, x, codebook)
    assert torch.equal(indices, expected) and indices[4] == 0 and indices[17] == 0 and indices[20] >= 100
    torch.testing.assert_close(sqdist, expected_sqdist, equal_nan=True, **TOLERANCES["sqdist"])
    torch.testing.assert_close(quantized, codebook[expected], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("layout", ["transposed", "row_step", "column_slice"])
def test_non_contiguous_x(pair, layout):
    generator = torch.Generator().manual_seed(7)
    codebook = torch.randn(257, 33, generator=generator)
    x = non_contiguous_rows(pair, layout, 33, 33, generator)
    assert not x.is_contiguous()
    got = to_cpu(*torch.ops.fastvq.triton_nearest_code(x, pair.to(codebook), True))
    dense = to_cpu(*torch.ops.fastvq.triton_nearest_code(x.contiguous(), pair.to(codebook), True))
    for a, b in zip(got, dense):
        assert torch.equal(a, b)
    pair.assert_nearest(x.cpu(), codebook, got[0])


def test_zero_rows(pair):
    indices, sqdist, quantized, range_check = raw(pair, torch.empty(0, 3), randn(1030, 3, seed=0))
    assert indices.shape == sqdist.shape == (0,) and quantized.shape == (0, 3)
    assert range_check.tolist() == [1030, 0]


def test_mixed_dtypes_and_quantized_off(pair):
    x, codebook = tie_inputs(33, 257, 4, seed=1)
    expected, _ = reference.nearest_code(x.double(), codebook.double())
    indices, sqdist, quantized, _ = raw(pair, x, codebook.to(torch.bfloat16))
    assert torch.equal(indices, expected) and torch.equal(quantized, codebook[expected])
    indices, _, quantized, _ = raw(pair, x, codebook, want_quantized=False)
    assert torch.equal(indices, expected) and quantized.shape == (0, 4)


def test_split_and_unsplit_agree_and_deterministic_mode_repeats(pair, monkeypatch):
    x, codebook = tie_inputs(33, 1030, 6, seed=4)
    with monkeypatch.context() as unsplit_only:
        unsplit_only.setattr(split, "use_split", lambda num_rows, num_codes, sms: False)
        unsplit = raw(pair, x, codebook)
    monkeypatch.setenv("FASTVQ_DETERMINISTIC", "1")
    first, second = raw(pair, x, codebook), raw(pair, x, codebook)
    for a, b, c in zip(unsplit, first, second):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_far_row_is_a_range_error(pair):
    x = randn(33, 16, seed=4)
    x[21] = -1e19
    with pytest.raises(ValueError, match=r"x row 21 is too far from the search centre"):
        fastvq.nearest_code(*pair.to(x, randn(1030, 16, seed=3)), backend="triton")
