"""What is specific to the triton backend: its raw ops' edge cases, the deterministic mode, the
interpreter/compiled mode switch, its options and reasons, and what torch.compile and nvcc see.

The op-correctness tests of the Triton kernels are the shared bodies in test_nearest_code.py,
test_quantize.py and test_ema_stats.py (the triton-cuda and triton-cpu pairs). Cases here that
launch a kernel take ``triton_pair``: on CUDA tensors when a GPU is present, and on CPU tensors in
the fresh TRITON_INTERPRET=1 process that test_triton_interpreter.py starts. What the interpreter
cannot check (tensor-core tl.dot, atomics, register and shared-memory limits) is covered by
test_kernels_compile_for_gpus, which compiles the kernels to sm_80/sm_90 cubins.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

import fastvq  # noqa: E402
import fastvq.triton.segment_sum  # noqa: E402
from fastvq import dispatch, numerics, reference  # noqa: E402

from conftest import TOLERANCES, randn, skip_on_interpreter, to_cpu, use_reduction  # noqa: E402


def run(pair, op, *args):
    """A torch.ops.fastvq op with its tensor args on the pair's device; results on the CPU."""
    out = op(*(pair.to(a) if isinstance(a, torch.Tensor) else a for a in args))
    return to_cpu(*out) if isinstance(out, tuple) else to_cpu(out)


# ---- the raw triton ops ----------------------------------------------------------------------
def test_triton_op_handles_zero_rows_directly(triton_pair):
    # ops.py never sends N = 0 to a backend; the triton op must still not launch an empty grid.
    indices, sqdist, quantized, range_check = run(triton_pair, torch.ops.fastvq.triton_nearest_code,
                                                  torch.empty(0, 3), randn(5, 3, seed=0), True)
    assert indices.shape == sqdist.shape == (0,) and quantized.shape == (0, 3)
    assert range_check.tolist() == [5, 0]  # (K, N): nothing out of range


@pytest.mark.parametrize("reduction", ["atomic", "deterministic"])
def test_out_of_range_indices_are_ignored_not_written(triton_pair, monkeypatch, reduction):
    # fastvq.functional rejects them; the kernels still never write outside (K, d).
    use_reduction(monkeypatch, reduction)
    x = randn(7, 3, seed=0)
    indices = torch.tensor([0, 3, 1, -1, 2, 99, 0])
    counts, sums = run(triton_pair, torch.ops.fastvq.triton_ema_stats, x, indices, 3)
    keep = (indices >= 0) & (indices < 3)
    want_counts, want_sums = reference.ema_stats(x[keep], indices[keep], 3)
    torch.testing.assert_close(counts, want_counts, rtol=0, atol=0)
    torch.testing.assert_close(sums, want_sums, **TOLERANCES[torch.float32])
    grad_x, grad_codebook = run(triton_pair, torch.ops.fastvq.triton_quantize_backward,
                                x, x, randn(3, 3, seed=1), indices, torch.tensor(1.0), torch.tensor(1.0), True, True)
    assert bool(torch.isfinite(grad_x).all()) and bool(torch.isfinite(grad_codebook).all())


def test_deterministic_mode_is_bitwise_reproducible(triton_pair, monkeypatch):
    monkeypatch.setenv("FASTVQ_DETERMINISTIC", "1")
    x, codebook = randn(300, 33, seed=5), randn(3, 33, seed=6)
    indices = torch.randint(0, 3, (300,), generator=torch.Generator().manual_seed(1))
    scales = (torch.tensor(0.1), torch.tensor(0.2))
    for op, args in [(torch.ops.fastvq.triton_ema_stats, (x, indices, 3)),
                     (torch.ops.fastvq.triton_quantize_backward, (x, x, codebook, indices, *scales, True, True))]:
        first, second = run(triton_pair, op, *args), run(triton_pair, op, *args)
        for a, b in zip(first, second):
            assert torch.equal(a, b)


def test_column_strides_beyond_int32_are_addressed_in_int64(triton_pair):
    # A batch-1 channel-first feature map seen as (H·W, C) rows has column stride H·W: at 64×384×384
    # and d = 256 its last column starts past 2^31 elements. Here 5 columns 2^29 elements apart (4 GiB
    # of float16, allocated but untouched except for the 15 values): int32 offsets wrap (a wrong
    # address or a crash); every kernel must compute them in int64.
    stride = 2**29
    base = torch.empty(4 * stride + 8, dtype=torch.float16, device=triton_pair.device)
    x = base.as_strided((3, 5), (1, stride))
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(-4, 5, (3, 5), generator=generator).half()
    codebook = triton_pair.to(torch.randint(-4, 5, (6, 5), generator=generator).half())
    x.copy_(triton_pair.to(values))
    dense = triton_pair.to(values)
    indices = triton_pair.to(torch.tensor([0, 5, 0]))
    scales = (triton_pair.to(torch.tensor(0.5)), triton_pair.to(torch.tensor(2.0)))
    calls = [
        lambda v: torch.ops.fastvq.triton_nearest_code(v, codebook, True),
        lambda v: torch.ops.fastvq.triton_nearest_codes(v, codebook, 4),
        lambda v: torch.ops.fastvq.triton_ema_stats(v, indices, 6),
        lambda v: torch.ops.fastvq.triton_quantize_backward(v, v, codebook, indices, *scales, True, True),
        lambda v: torch.ops.fastvq.triton_quantize_backward(v, v, codebook, indices, *scales, True, True, True),
    ]
    for call in calls:
        for got, want in zip(to_cpu(*call(x)), to_cpu(*call(dense))):
            assert torch.equal(got, want)  # small integers: every result is exact
    segment = run(triton_pair, lambda v: fastvq.triton.segment_sum.segment_sum(
        v, *numerics.sort_by_code(indices, 6), 6), x)
    assert torch.equal(segment, run(triton_pair, lambda v: fastvq.triton.segment_sum.segment_sum(
        v, *numerics.sort_by_code(indices, 6), 6), dense))


def test_launches_capture_what_runs_and_deterministic_mode_runs_the_fixed_config(monkeypatch):
    # What each launch would run, stopped before it runs (fastvq.triton._jit.capture_launches).
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from fastvq.triton import _jit, _score_tile, ema_stats, nearest_code

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def captured(call):
        with _jit.capture_launches(), pytest.raises(_jit.Captured) as caught:
            call()
        return caught.value

    x, codebook = randn(300, 33, seed=0), randn(70, 33, seed=1)
    monkeypatch.setenv("FASTVQ_DETERMINISTIC", "0")
    tuned = captured(lambda: nearest_code.triton_nearest_code(x, codebook, True))
    assert isinstance(tuned.kernel, Autotuner) and "BLOCK_N" not in tuned.kwargs
    # every constexpr that changes the code, and ceil(log2 N), are in the autotuner's key
    assert set(tuned.kernel.keys) >= {"K", "d", "N_BUCKET", "WRITE_QUANTIZED", "CAST_TO_FP32", "INPUT_PRECISION",
                                       "BLOCK_D", "X_RESIDENT"}
    assert tuned.args[tuned.kernel.fn.arg_names.index("N_BUCKET")] == 9  # 2^8 < 300 <= 2^9
    monkeypatch.setenv("FASTVQ_DETERMINISTIC", "1")
    fixed = captured(lambda: nearest_code.triton_nearest_code(x, codebook, True))
    assert isinstance(fixed.kernel, JITFunction)
    assert fixed.kwargs == {**fixed.kwargs, **_jit.config_kwargs(_score_tile.DETERMINISTIC_CONFIG_FP32)}  # float32
    # ema_stats counts with int64 atomics (float32 ones stop at 2^24 per code) and sums in float64
    monkeypatch.setenv("FASTVQ_DETERMINISTIC", "0")
    stats = captured(lambda: ema_stats.triton_ema_stats(x, torch.zeros(300, dtype=torch.int64), 70))
    names = stats.kernel.arg_names
    assert stats.args[names.index("counts_ptr")].dtype == torch.int64
    assert stats.args[names.index("sums_ptr")].dtype == torch.float64


def test_ema_stats_counts_past_two_to_the_24(triton_pair):
    skip_on_interpreter(triton_pair, "2^24 + 3 rows")
    num_rows = 2**24 + 3  # a float32 count stops at 2^24
    x = torch.ones(num_rows, 1, device=triton_pair.device)
    counts, sums = torch.ops.fastvq.triton_ema_stats(x, torch.zeros(num_rows, dtype=torch.int64,
                                                                    device=triton_pair.device), 2)
    exact = float(torch.tensor(num_rows, dtype=torch.float32))  # 2^24 + 4: the count, rounded once
    assert counts.tolist() == [exact, 0.0] and sums[:, 0].tolist() == [exact, 0.0]


# ---- the backend, its options and its reasons ------------------------------------------------
def test_backend_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reasons = dispatch.get_backend("triton").not_supported_reasons(torch.empty(1, 1))
    assert reasons == ["device cpu: triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1"]
    with pytest.raises(dispatch.BackendNotSupportedError, match="TRITON_INTERPRET=1"):
        fastvq.nearest_code(torch.zeros(2, 2), torch.zeros(2, 2), backend="triton")


def test_backend_reasons_and_description(triton_pair):
    backend = dispatch.get_backend("triton")
    assert backend.unavailable_reason() is None
    probe = torch.empty(1, 1, device=triton_pair.device)
    assert backend.not_supported_reasons(probe, probe.to(torch.bfloat16)) == []
    assert backend.not_supported_reasons(probe.double()) == ["dtype float64: triton supports float32, bfloat16, float16"]
    assert ("TRITON_INTERPRET=1" if triton_pair.interpreted else "CUDA tensors") in backend.describe()
    assert dispatch.resolve("auto", torch.empty(1, 1)).name != "triton"  # never auto on CPU


def test_kernels_follow_the_interpreter_setting_at_launch(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from fastvq.triton import _jit, nearest_code

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert isinstance(_jit.for_current_mode(nearest_code._nearest_code_kernel).fn, InterpretedFunction)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert isinstance(_jit.for_current_mode(nearest_code._nearest_code_kernel).fn, JITFunction)


def test_aot_autograd_traces_into_the_triton_kernels(monkeypatch):
    # What torch.compile sees: each triton_op decomposes into triton_kernel_wrapper_functional nodes
    # (no kernel is compiled or run here). Compiled-mode kernels, so the interpreter is switched off.
    from functorch.compile import aot_function

    import fastvq.triton  # noqa: F401  (registers torch.ops.fastvq.triton_*)

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, codebook = randn(7, 3, seed=0), randn(5, 3, seed=1)
    indices = torch.randint(0, 5, (7,), generator=torch.Generator().manual_seed(0))
    scales = (torch.tensor(0.1), torch.tensor(0.2))
    calls = {
        "triton_nearest_code": (lambda a, b: torch.ops.fastvq.triton_nearest_code(a, b, True), (x, codebook)),
        "triton_ema_stats": (lambda a, i: torch.ops.fastvq.triton_ema_stats(a, i, 5), (x, indices)),
        "triton_quantize_backward": (lambda a, b, i, s, t: torch.ops.fastvq.triton_quantize_backward(
            a, a, b, i, s, t, True, True), (x, codebook, indices, *scales)),
    }

    class Traced(Exception):
        pass

    for name, (fn, args) in calls.items():
        graphs = []

        def capture(graph_module, example_inputs):
            graphs.append(graph_module.code)
            raise Traced  # stop before anything would run

        with pytest.raises(Traced):
            aot_function(fn, fw_compiler=capture)(*args)
        assert "triton_kernel_wrapper_functional" in graphs[0], f"{name}: {graphs[0]}"
        assert f"fastvq.{name}" not in graphs[0], f"{name} stayed opaque: {graphs[0]}"


def test_options(monkeypatch):
    from fastvq import triton as fvt

    monkeypatch.setenv("FASTVQ_TRITON_TF32", "1")
    assert fvt.allow_tf32()
    fvt.set_allow_tf32(False)
    try:
        assert not fvt.allow_tf32()
        with pytest.raises(TypeError, match="allow must be a bool or None"):
            fvt.set_allow_tf32("yes")
    finally:
        fvt.set_allow_tf32(None)
    monkeypatch.delenv("FASTVQ_TRITON_TF32")
    assert fvt.fp32_precision() == "tf32x3"  # the default: 3xTF32 tensor cores
    monkeypatch.setenv("FASTVQ_TRITON_TF32", "1")
    assert fvt.fp32_precision() == "tf32"
    monkeypatch.setenv("FASTVQ_TRITON_FP32_PRECISION", "IEEE")  # the precision's own variable wins
    assert fvt.fp32_precision() == "ieee" and not fvt.allow_tf32()
    monkeypatch.setenv("FASTVQ_TRITON_FP32_PRECISION", "fp64")
    with pytest.raises(ValueError, match="FASTVQ_TRITON_FP32_PRECISION must be one of"):
        fvt.fp32_precision()
    fvt.set_fp32_precision("tf32x3")  # a call beats the environment
    try:
        assert fvt.fp32_precision() == "tf32x3"
        fvt.set_allow_tf32(True)
        assert fvt.fp32_precision() == "tf32" and fvt.allow_tf32()
        with pytest.raises(ValueError, match="precision must be one of"):
            fvt.set_fp32_precision("tf32x6")
    finally:
        fvt.set_fp32_precision(None)
    monkeypatch.setenv("FASTVQ_DETERMINISTIC", "0")
    assert not fvt.deterministic()
    torch.use_deterministic_algorithms(True)
    try:
        assert fvt.deterministic()
    finally:
        torch.use_deterministic_algorithms(False)


def test_compile_check_finds_the_main_loop_in_sass():
    # The innermost backward branch around the most dot instructions (tensor-core ones first); a
    # loop around it (the d-slices inside a code-tile loop) counts its body once per slice.
    from fastvq.triton._sass import main_loop_instructions

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   FFMA R5, R2, R3, R4 ;
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0040*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0050*/              @!P0 BRA 0x20 ;
        /*0060*/                   FMNMX R6, R4, R5, PT ;
        /*0070*/              @!P1 BRA 0x10 ;
        /*0080*/                   FFMA R5, R2, R3, R4 ;
        /*0090*/                   FFMA R5, R2, R3, R4 ;
        /*00a0*/                   FFMA R5, R2, R3, R4 ;
        /*00b0*/              @!P2 BRA 0x80 ;
        /*00c0*/                   EXIT ;
    """
    assert main_loop_instructions(sass, d_slices=1) == 4  # 0x20..0x50, not the FFMA loop
    assert main_loop_instructions(sass, d_slices=3) == 3 + 3 * 4  # 0x10..0x70 with the inner loop thrice


def test_compile_check_reads_the_wgmma_waits_of_the_main_loop():
    # An unconditional backward branch (an mbarrier wait's out-of-line retry jumping back) is not a loop, even
    # around more dots than the loop has; the waits counted are the loop's own.
    from fastvq.triton._sass import main_loop, main_loop_instructions, main_loop_wgmma_waits

    sass = """
        /*0000*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR16], RZ, !UPT ;
        /*0010*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR16], RZ, !UPT ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R88, gdesc[UR16], RZ, !UPT ;
        /*0040*/                   WARPGROUP.DEPBAR.LE gsb0, 0x2 ;
        /*0050*/                   FMNMX R6, R4, R5, PT ;
        /*0060*/               @P1 BRA 0x20 ;
        /*0070*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x0 ;
    """
    assert main_loop(sass) == (0x20, 0x60)
    assert main_loop_instructions(sass, d_slices=1) == 5
    assert main_loop_wgmma_waits(sass) == [2]
    assert main_loop_wgmma_waits(sass.replace("gsb0, 0x2", "gsb0, 0x0")) == [0]


def test_compile_check_counts_the_path_that_skips_a_block():
    # nearest_codes: a tile that enters no row's list branches over its top-k and merge.
    from fastvq.triton._sass import main_loop_instructions

    sass = """
        /*0000*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0010*/                   FMNMX R6, R4, R5, PT ;
        /*0020*/              @!P2 BRA 0x60 ;
        /*0030*/                   SHFL.BFLY PT, R7, R6, 0x1, 0x1f ;
        /*0040*/                   IMNMX R6, R6, R7, PT ;
        /*0050*/                   SHFL.BFLY PT, R7, R6, 0x2, 0x1f ;
        /*0060*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0070*/               @P0 BRA 0x0 ;
        /*0080*/                   EXIT ;
    """
    assert main_loop_instructions(sass, d_slices=1) == 8
    assert main_loop_instructions(sass, d_slices=1, skipping=True) == 5  # 0x30..0x50 skipped


def test_compile_check_fails_spills_shared_memory_and_a_search_over_its_target():
    from fastvq.triton.compile_check import SHARED_LIMIT, TARGET_PER_ELEMENT, Case, problems_of

    search = Case("search", lambda: None, search=True, target=TARGET_PER_ELEMENT)
    large = {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8}
    assert problems_of(search, 90, large, 1024, 0, 4.8, 2) == []
    assert problems_of(search, 90, large, 1024, 0, 5.1, 2)  # over the target
    assert problems_of(search, 90, large, 1024, 0, None, 2)  # no main loop found is no pass
    assert problems_of(search, 90, large, 1024, 0, 4.8, 1) == []  # one program, but two warpgroups
    one_warpgroup = {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4}
    assert problems_of(search, 90, one_warpgroup, 1024, 0, 4.8, 2) == []
    assert problems_of(search, 90, one_warpgroup, 1024, 0, 4.8, 1)  # nothing to overlap its epilogue with
    assert problems_of(search, 80, large, 1024, 0, 5.1, 1) == []  # the target is sm_90's
    assert problems_of(search, 90, {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4}, 1024, 0, 9.2, 1) == []  # half wgmma
    assert problems_of(search, 90, large, 1024, 8, 4.8, 2)  # a spill
    assert problems_of(search, 80, large, SHARED_LIMIT[80] + 1, 0, 4.8, 2)  # over the chip's shared memory
    assert problems_of(Case("other", lambda: None), 90, {}, 1024, 0, None, 1) == []
    pipelined = Case("gluon", lambda: None, search=True, target=TARGET_PER_ELEMENT, overlap=True)
    assert problems_of(pipelined, 90, one_warpgroup, 1024, 0, 3.5, 2, [2]) == []
    assert problems_of(pipelined, 90, one_warpgroup, 1024, 0, 3.5, 2, [2, 0])  # one wait drains the wgmma
    assert problems_of(pipelined, 90, one_warpgroup, 1024, 0, 3.5, 2, [])  # no wait found is no pass


def test_resident_programs_per_sm():
    from fastvq.triton.compile_check import resident_programs

    assert resident_programs(90, 128, 8, 57344) == 2  # 4096 registers a warp: 4 warps per sub-partition
    assert resident_programs(90, 127, 8, 57344) == 2  # rounded up to the same 4096
    assert resident_programs(90, 129, 8, 57344) == 1  # 4352 a warp: 3 per sub-partition, 12 warps
    assert resident_programs(90, 123, 4, 38912) == 4  # registers: 16 warps; shared: 5 programs
    assert resident_programs(90, 64, 4, 100 * 1024) == 2  # shared: 228 KiB / (100 KiB + 1 KiB reserved)
    assert resident_programs(80, 64, 4, 100 * 1024) == 1  # sm_80 has 164 KiB
    assert resident_programs(90, 32, 1, 0) == 32  # the cap on programs per SM
    assert resident_programs(90, 16, 32, 0) == 2  # the cap of 64 warps


def test_kernels_compile_for_gpus():
    # A fresh process: this one's triton library may be in interpreter mode.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "fastvq.triton.compile_check"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_float32_operands_reach_tl_dot_at_the_chosen_precision(monkeypatch):
    # The searches' tl.dot gets fastvq.triton.fp32_precision() for float32 operands (float32 or mixed inputs),
    # "tf32x3" by default, and "tf32" (ignored by Triton) for bf16/fp16 tensor cores.
    from fastvq.triton import _jit, nearest_code, nearest_codes

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name in ("FASTVQ_TRITON_TF32", "FASTVQ_TRITON_FP32_PRECISION"):
        monkeypatch.delenv(name, raising=False)

    def precision_of(call):
        with _jit.capture_launches(), pytest.raises(_jit.Captured) as caught:
            call()
        return caught.value.kwargs["INPUT_PRECISION"]

    x, codebook = randn(300, 33, seed=0), randn(70, 33, seed=1)
    searches = {"nearest_code": lambda a, b: nearest_code.triton_nearest_code(a, b, True),
                "nearest_codes": lambda a, b: nearest_codes.triton_nearest_codes(a, b, 4)}
    for name, search in searches.items():
        assert precision_of(lambda: search(x, codebook)) == "tf32x3", name
        assert precision_of(lambda: search(x.bfloat16(), codebook)) == "tf32x3", name  # mixed: float32 operands
        assert precision_of(lambda: search(x.bfloat16(), codebook.bfloat16())) == "tf32", name
        for precision in ("ieee", "tf32"):
            _jit.set_fp32_precision(precision)
            try:
                assert precision_of(lambda: search(x, codebook)) == precision, name
            finally:
                _jit.set_fp32_precision(None)


def test_norm_pieces_sum_exactly_to_half_the_norm():
    # bf16 searches start each score at ||e'||^2 / 2 from three bf16 pieces (_argmin_walk.py): their exact
    # sum must be that float32 value, or the argmin would move by the norm's lost bits.
    from fastvq.triton.nearest_code import norm_pieces

    generator = torch.Generator().manual_seed(0)
    scales = 10.0 ** torch.randint(-30, 30, (2000,), generator=generator).double()
    finite = torch.cat([(torch.rand(2000, generator=generator, dtype=torch.float64) * scales).float(),
                        torch.tensor([0.0, 1.0, 3.0, 2.0**24 - 1, 3.4e38, 2.0**-116])])
    pieces = norm_pieces(torch.cat([finite, torch.tensor([torch.inf])]), torch.bfloat16)
    assert pieces.dtype == torch.bfloat16 and pieces.shape == (len(finite) + 1, 16)
    assert not pieces[:, 3:].any()
    assert torch.equal(pieces[:-1].double().sum(1), finite.double() / 2)
    assert pieces[-1, 0] == torch.inf and not pieces[-1, 1:].any()


def test_bf16_searches_fold_the_norms_and_negate_the_codes(monkeypatch):
    # Only a bf16 x against a bf16 codebook takes the folded walk; its codes go to the kernel as c - e.
    from fastvq.triton import _jit, nearest_code

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def launch_of(x, codebook):
        with _jit.capture_launches(), pytest.raises(_jit.Captured) as caught:
            nearest_code.triton_nearest_code(x, codebook, True)
        return caught.value

    x, codebook = randn(300, 33, seed=0), randn(70, 33, seed=1)
    folded = launch_of(x.bfloat16(), codebook.bfloat16())
    assert folded.kwargs["FOLD_NORMS"]
    centre, codes, pieces = folded.args[1], folded.args[2], folded.args[3]
    assert pieces.shape == (128, 16)
    assert torch.equal(codes[:70], (centre - codebook.bfloat16().float()).bfloat16())
    for dtypes in [(torch.float16, torch.float16), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)]:
        assert not launch_of(x.to(dtypes[0]), codebook.to(dtypes[1])).kwargs["FOLD_NORMS"]


def test_wide_x_stays_resident_on_tensor_cores_up_to_d_256(monkeypatch):
    # Issue 14, item 5: bf16/fp16 x up to d = 256 is one resident tile (no d-slices draining the pipeline per
    # code tile), searched at the configs that hold it without spilling; beyond 256, 64-wide d-slices.
    from fastvq.triton import _jit, _score_tile, nearest_code

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def launch_of(dim, dtype=torch.bfloat16):
        with _jit.capture_launches(), pytest.raises(_jit.Captured) as caught:
            nearest_code.triton_nearest_code(randn(300, dim, seed=0).to(dtype), randn(70, dim, seed=1).to(dtype), True)
        return caught.value

    for dim, block_d, resident in [(129, 256, True), (256, 256, True), (257, 64, False), (64, 64, True)]:
        launched = launch_of(dim)
        assert (launched.kwargs["BLOCK_D"], launched.kwargs["X_RESIDENT"]) == (block_d, resident), dim
    assert launch_of(200, torch.float32).kwargs["BLOCK_D"] == 32  # float32 operands: resident only to 64

    spec = nearest_code._nearest_code_kernel._fastvq_spec
    wide = launch_of(256)
    kept = spec.prune(spec.configs, {}, **wide.kwargs)
    assert {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) for c in kept} == {
        (32, 64, 4, 2), (32, 64, 4, 3), (128, 64, 8, 3)}
    assert spec.fixed_config(wide.kwargs) is _score_tile.DETERMINISTIC_CONFIG_WIDE
    assert spec.fixed_config(launch_of(64).kwargs) is _score_tile.DETERMINISTIC_CONFIG


# ---- the opt-in Gluon search (nearest_code_gluon.py; runs on Hopper only) --------------------
def test_search_kernel_option(monkeypatch):
    from fastvq import triton as fvt

    monkeypatch.delenv("FASTVQ_TRITON_SEARCH_KERNEL", raising=False)
    assert fvt.search_kernel() == "triton"
    monkeypatch.setenv("FASTVQ_TRITON_SEARCH_KERNEL", "Gluon")
    assert fvt.search_kernel() == "gluon"
    monkeypatch.setenv("FASTVQ_TRITON_SEARCH_KERNEL", "cutlass")
    with pytest.raises(ValueError, match="FASTVQ_TRITON_SEARCH_KERNEL must be one of .*'cutlass'"):
        fvt.search_kernel()
    fvt.set_search_kernel("triton")  # a call beats the environment
    try:
        assert fvt.search_kernel() == "triton"
        with pytest.raises(ValueError, match="name must be one of .*'wgmma'"):
            fvt.set_search_kernel("wgmma")
    finally:
        fvt.set_search_kernel(None)
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    assert "CUDA device" in fvt.gluon_search_reason(x, x)
    assert "bfloat16" in fvt.gluon_search_reason(x.float(), x.float())
    assert "d = 65 > 64" in fvt.gluon_search_reason(torch.zeros(4, 65, dtype=torch.bfloat16),
                                                    torch.zeros(4, 65, dtype=torch.bfloat16))


def _gluon_launch(monkeypatch, num_rows, num_codes, dim):
    """The Gluon search's launch for bf16 inputs, as if on a Hopper GPU (captured, not run)."""
    from fastvq.triton import _jit, nearest_code, nearest_code_gluon

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FASTVQ_TRITON_SEARCH_KERNEL", "gluon")
    monkeypatch.setattr(nearest_code_gluon, "supports", lambda x, codebook: None)
    x, codebook = randn(num_rows, dim, seed=0).bfloat16(), randn(num_codes, dim, seed=1).bfloat16()
    with _jit.capture_launches(), pytest.raises(_jit.Captured) as caught:
        nearest_code.triton_nearest_code(x, codebook, True)
    return caught.value, codebook


def test_gluon_search_gets_padded_codes_norm_pieces_and_a_grid_that_fills_the_gpu(monkeypatch):
    from fastvq.triton import nearest_code_gluon, nearest_code_split

    launched, codebook = _gluon_launch(monkeypatch, 300, 70, 33)
    assert launched.kernel is nearest_code_gluon._nearest_code_keys_kernel
    centre, codes_desc, pieces_desc = launched.args[1], launched.args[2], launched.args[3]
    assert codes_desc.block_shape == [nearest_code_gluon.BLOCK_K, 64]  # d = 33 padded to 64 columns (TMA rows)
    padded = codes_desc.base
    assert padded.shape == (128, 64) and padded.stride() == (64, 1)
    assert torch.equal(padded[:70, :33], (centre - codebook.float()).bfloat16())  # negated, centred codes
    assert not padded[:, 33:].any() and not padded[70:].any()
    assert torch.isinf(pieces_desc.base[70:, 0].float()).all()  # padding codes: half-norm +inf
    assert launched.grid == (5, 1)  # 300 rows in 64-row programs, one code range

    # N = 256, K = 65536: 4 row programs alone would leave an H200 idle; code ranges fill its 132 SMs.
    launched, _ = _gluon_launch(monkeypatch, 256, 65536, 64)
    rows, ranges = launched.grid
    assert rows == 4 and rows * ranges >= nearest_code_split.PROGRAMS_PER_SM * nearest_code_split.STAND_IN_SM_COUNT
    assert launched.args[-1] == 65536 // nearest_code_gluon.BLOCK_K  # num_tiles


def test_gluon_search_keys_reach_the_split_epilogue(triton_pair, monkeypatch):
    # The host side of the Gluon path, with the Gluon kernel (which only a Hopper GPU runs) replaced by the
    # Triton split search, whose keys share its contract: the outputs must be the reference's.
    from fastvq.triton import nearest_code_gluon, nearest_code_split

    calls = []

    def keys_by_triton(x, centre, codes, pieces, num_codes, sms):
        calls.append(codes.shape)
        return nearest_code_split.split_search(x, centre, codes, pieces, cast_to_fp32=triton_pair.interpreted,
                                               input_precision="tf32", block_d=64, resident=True, fold_norms=True)

    monkeypatch.setenv("FASTVQ_TRITON_SEARCH_KERNEL", "gluon")
    monkeypatch.setattr(nearest_code_gluon, "supports", lambda x, codebook: None)
    monkeypatch.setattr(nearest_code_gluon, "search_keys", keys_by_triton)
    g = torch.Generator().manual_seed(7)
    x = torch.randint(-3, 4, (97, 33), generator=g).bfloat16()
    codebook = torch.randint(-3, 4, (70, 33), generator=g).bfloat16()
    indices, sqdist, quantized, _ = run(triton_pair, torch.ops.fastvq.triton_nearest_code, x, codebook, True)
    assert calls == [(128, 33)]
    want, want_sqdist = reference.nearest_code(x.float(), codebook.float())
    assert torch.equal(indices, want)  # small integers: exact distances, ties to the lowest index
    torch.testing.assert_close(sqdist, want_sqdist, **TOLERANCES["sqdist"])
    assert torch.equal(quantized, codebook[want])


def test_float32_search_passes_the_tf32x3_slack_on_adversarial_data(triton_pair):
    # x resident at "tf32x3" (the default): the kernels split x and the codes into TF32 parts themselves
    # (_score_tile.tf32x3_dot), so even the interpreter, whose dots are float32 products, is judged at that
    # slack. Dropping one of the three dots fails this on the near-ties of test_search_precision's data.
    from test_search_precision import adversarial

    for dim in (3, 17):
        for seed in range(2):
            x, codebook = adversarial(dim, 0.0, seed)
            indices = run(triton_pair, torch.ops.fastvq.triton_nearest_code, x, codebook, False)[0]
            assert triton_pair.precision(x, codebook) == "tf32x3"
            triton_pair.assert_nearest(x, codebook, indices)
