"""``python -m fastvq.triton.compile_check [--all]``: compile every fastvq Triton kernel to
sm_80 and sm_90 cubins without a GPU, and fail on any compiler error.

The interpreter (how the tests run the kernels on CPU) never lowers tl.dot to tensor
cores, never emits atomics, and knows no register or shared-memory limits; this does.
It also checks each kernel's static shared memory against the architecture's limit.
By default one representative specialisation per kernel and path is compiled (about
ten seconds); ``--all`` compiles every autotune config of the search for both archs.
Run it in a process where TRITON_INTERPRET is unset (triton's own library must not be
decorated for the interpreter).
"""
from __future__ import annotations

import argparse
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

from . import ema_stats, nearest_code, quantize_backward, segment_sum
from ._jit import MAX_BLOCK_D, block_d_for

# Largest dynamic shared memory per block, bytes (CUDA programming guide, compute capabilities).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_TYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def jit_function(decorated):
    """The compiled-mode JITFunction behind one of fastvq's kernels."""
    built = decorated._fastvq_spec.build(False)
    return built.fn if isinstance(built, Autotuner) else built


def compile_kernel(decorated, pointer_types: dict, constexprs: dict, arch: int, num_warps=4, num_stages=3):
    fn = jit_function(decorated)
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_types[name]
        else:
            signature[name] = "i32"
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(name),): value for name, value in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def search_case(dtype: str, dim: int, tensor_cores: bool, config: triton.Config, want_quantized=True):
    t = _TYPE[dtype]
    block_d = block_d_for(dim, MAX_BLOCK_D if tensor_cores else MAX_BLOCK_D // 2)
    pointers = dict(x_ptr=t, centre_ptr="fp32", codes_ptr=t if tensor_cores else "fp32", code_norms_ptr="fp32",
                    codebook_ptr=t, indices_ptr="i64", sqdist_ptr="fp32", quantized_ptr=t, range_check_ptr="i64")
    constexprs = dict(WRITE_QUANTIZED=want_quantized, CAST_TO_FP32=not tensor_cores,
                      INPUT_PRECISION="tf32" if tensor_cores else "ieee", BLOCK_D=block_d,
                      X_RESIDENT=dim <= block_d, **config.kwargs)
    label = (f"nearest_code {dtype} d={dim} {'tensor-core' if tensor_cores else 'fp32-ieee'} "
             f"{config.kwargs} w{config.num_warps}s{config.num_stages}")
    return label, nearest_code._nearest_code_kernel, pointers, constexprs, config.num_warps, config.num_stages


def default_cases():
    configs = {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps): c for c in nearest_code._CONFIGS}
    big, mid = configs[(128, 64, 8)], configs[(64, 64, 4)]
    yield search_case("bfloat16", 64, True, big), (80, 90)
    yield search_case("float16", 200, True, mid, want_quantized=False), (90,)
    yield search_case("float32", 33, False, mid), (80,)
    yield search_case("float32", 130, False, mid), (90,)
    yield ("ema_stats bfloat16", ema_stats._ema_stats_kernel,
           dict(x_ptr="bf16", indices_ptr="i64", counts_ptr="fp32", sums_ptr="fp32"),
           dict(BLOCK_N=64, BLOCK_D=64), 4, 1), (80, 90)
    yield ("quantize_backward float16", quantize_backward._quantize_backward_kernel,
           dict(grad_q_ptr="fp16", x_ptr="fp16", codebook_ptr="fp16", indices_ptr="i64", commit_scale_ptr="fp32",
                grad_x_ptr="fp16", grad_codebook_ptr="fp32"),
           dict(NEED_GRAD_X=True, SCATTER_GRAD_CODEBOOK=True, BLOCK_N=32, BLOCK_D=128), 4, 1), (80, 90)
    yield ("quantize_backward bfloat16 rotation trick", quantize_backward._quantize_backward_kernel,
           dict(grad_q_ptr="bf16", x_ptr="bf16", codebook_ptr="bf16", indices_ptr="i64", commit_scale_ptr="fp32",
                grad_x_ptr="bf16", grad_codebook_ptr="fp32"),
           dict(NEED_GRAD_X=True, SCATTER_GRAD_CODEBOOK=True, BLOCK_N=4, BLOCK_D=128, ROTATION_TRICK=True), 4, 1), (90,)
    yield ("segment_sum float32 residual", segment_sum._segment_sum_kernel,
           dict(x_ptr="fp32", perm_ptr="i64", offsets_ptr="i64", codebook_ptr="fp32", out_ptr="fp32"),
           dict(RESIDUAL=True, BLOCK_R=32, BLOCK_D=128), 4, 1), (80, 90)


def all_search_cases():
    for config in nearest_code._CONFIGS:
        yield search_case("bfloat16", 256, True, config), (80, 90)
        yield search_case("float32", 64, False, config), (80, 90)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="also compile every search autotune config")
    args = parser.parse_args(argv)
    cases = list(default_cases()) + (list(all_search_cases()) if args.all else [])
    failures = 0
    start = time.perf_counter()
    for (label, decorated, pointers, constexprs, warps, stages), archs in cases:
        for arch in archs:
            began = time.perf_counter()
            try:
                compiled = compile_kernel(decorated, pointers, constexprs, arch, warps, stages)
            except Exception as error:  # report every failure, then exit non-zero
                failures += 1
                print(f"FAIL sm_{arch} {label}: {type(error).__name__}: {error}")
                continue
            shared = compiled.metadata.shared
            status = "ok  " if shared <= SHARED_LIMIT[arch] else "OVER"
            if status == "OVER":
                print(f"note: sm_{arch} {label} needs {shared} B shared memory; the autotuner skips it there")
            print(f"{status} sm_{arch} {label}: {len(compiled.asm['cubin'])} B cubin, {shared} B shared, "
                  f"{time.perf_counter() - began:.1f} s")
    print(f"{'FAILED' if failures else 'all compiled'} in {time.perf_counter() - start:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
