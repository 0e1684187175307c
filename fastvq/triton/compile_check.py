"""``python -m fastvq.triton.compile_check [--all]``: compile fastvq's Triton kernels to sm_80 and
sm_90 cubins without a GPU, exactly as real launches specialise them, and report what ptxas made.

Each case runs a real launcher (triton_nearest_code, ...) on CPU tensors of a realistic shape
inside ``_jit.capture_launches``, which stops at the kernel launch and hands back the kernel and
its arguments. Those go through Triton's own launch-time binder for the target architecture, so
the compiled kernel has the runtime's specialisation (integers equal to 1 as constants, the
divisibility-by-16 hints on sizes, strides and pointers) and the launch's constexprs and options.

Per compiled kernel it prints registers per thread, stack bytes (spills; ptxas's stack frame,
read from the cubin with cuobjdump), shared memory, the programs that fit on one SM at once
(``resident_programs``), and for the searches the main loop's SASS instructions per score element:

    (instructions in the code-tile loop's body × threads per program) / (BLOCK_N · BLOCK_K)

where the loop is the innermost backward branch around the dot (HGMMA on sm_90, HMMA on sm_80,
FFMA for full-precision float32); when the d-slices loop inside it, its body counts once per
slice. Issue 14's target, <= 5 at bf16 d=64 on sm_90 (TARGET_PER_ELEMENT), is enforced on the cases
that name it, the unsplit and the split search, at every config with 64 rows per warpgroup: the lean
fold (_argmin_walk.py) takes an FMNMX and an FSEL per element, Triton's per-tile loads, wgmma
descriptors and x-operand reloads from shared memory the rest.

For nearest_codes it also prints the count on the path that skips a tile's top-k and merge (a tile
that enters no row's list branches over them; _sass.main_loop_instructions with ``skipping``).

The opt-in Gluon search (nearest_code_gluon.py) is compiled for sm_90 the same way (GluonASTSource); its
main loop steps two tiles, so its count is per 2 · BLOCK_N · BLOCK_K, and its point, the next tile's wgmma
running while the current tile is folded, is checked in the SASS: every ``WARPGROUP.DEPBAR.LE gsb0, n``
in its main loop must leave n > 0 groups in flight (ptxas serialises the wgmma, waiting at 0 after each,
when it cannot keep an accumulator in flight; a loop-carried copy of one does that).

It exits non-zero on a compiler error, a kernel over the architecture's shared memory, any spill,
or a search case over its target, or one of those configs with room for fewer than two warpgroups per
SM (MIN_RESIDENT_WARPGROUPS: one warpgroup's wgmma runs while another's epilogue does), or a Gluon
main loop that waits for all its wgmma. By default the
deterministic config and one large config of the search are compiled (about a minute); ``--all``
compiles every autotune config. Run it where TRITON_INTERPRET is unset.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import create_function_from_signature

from . import (_jit, ema_stats, nearest_code, nearest_code_gluon, nearest_code_split, nearest_codes, quantize_backward,
               segment_sum)
from ._sass import main_loop_instructions, main_loop_wgmma_waits
from ..numerics import sort_by_code

# Largest dynamic shared memory per block, bytes (CUDA programming guide, compute capabilities).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Per-SM resources (CUDA C++ Programming Guide, technical specifications per compute capability; the
# occupancy calculator's granularities): registers go to warps in units of 256 from 4 sub-partitions of
# 16K each, shared memory in units of 128 B plus 1 KiB the system reserves per program.
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
SHARED_RESERVED, SHARED_UNIT = 1024, 128
REGISTERS_PER_SUBPARTITION, SUBPARTITIONS, REGISTER_UNIT = 16384, 4, 256
MAX_WARPS_PER_SM, MAX_PROGRAMS_PER_SM = 64, 32
# Issue 14 asks the search to overlap a tile's MMA with an argmin epilogue. Triton 3.9 makes each
# warpgroup wait on its own wgmma (README), so the overlap has to come from another warpgroup on the SM,
# of the same program or of a second one: while one runs its epilogue, the other's wgmma keeps the tensor
# cores busy. The configs under the SASS target must leave room for this many warpgroups per SM.
MIN_RESIDENT_WARPGROUPS = 2
# Main-loop SASS instructions per score element, bf16 d=64 on sm_90 (issue 14, item 3), for the configs
# that give each warpgroup (4 warps) at least the 64 rows of one wgmma: 32-row tiles, autotuned for small
# N, leave half of each wgmma idle and take 6.6-13 per element.
TARGET_PER_ELEMENT = 5.0
WGMMA_ROWS = 64


@dataclass
class Case:
    label: str
    call: Callable[[], object]  # runs one launcher, which launches one kernel
    archs: tuple[int, ...] = (80, 90)
    search: bool = False  # report main-loop instructions per score element
    target: float | None = None  # and fail above this many on sm_90
    overlap: bool = False  # and fail on sm_90 unless the main loop keeps a wgmma group in flight at every wait
    skip_path: bool = False  # and report the main loop's path that skips the top-k merge (nearest_codes)


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def default_cases() -> list[Case]:
    bf16, fp16 = torch.bfloat16, torch.float16
    rows = torch.randint(0, 1024, (4096,), generator=torch.Generator().manual_seed(1))
    x16, x32 = _randn(4096, 128, dtype=fp16), _randn(4096, 128)
    return [
        Case("nearest_code bf16 d=64", lambda: nearest_code.triton_nearest_code(
            _randn(4096, 64, dtype=bf16), _randn(1024, 64, dtype=bf16), True), search=True,
            target=TARGET_PER_ELEMENT),
        # d up to 256 keeps x resident on tensor cores (issue 14, item 5); beyond, d-slices of 64
        Case("nearest_code fp16 d=200", lambda: nearest_code.triton_nearest_code(
            _randn(4096, 200, dtype=fp16), _randn(1024, 200, dtype=fp16), False), search=True),
        Case("nearest_code bf16 d=256", lambda: nearest_code.triton_nearest_code(
            _randn(4096, 256, dtype=bf16), _randn(1024, 256, dtype=bf16), True), search=True),
        Case("nearest_code bf16 d=384 (d-slices)", lambda: nearest_code.triton_nearest_code(
            _randn(4096, 384, dtype=bf16), _randn(1024, 384, dtype=bf16), True), (90,), search=True),
        # float32 operands (float32 or mixed inputs) at the default "tf32x3" (3xTF32: three TF32 dots on tensor
        # cores, HMMA/HGMMA) and at "ieee" (FFMA)
        Case("nearest_code fp32 d=33 tf32x3", lambda: nearest_code.triton_nearest_code(
            _randn(4096, 33), _randn(1024, 33), True), search=True),
        Case("nearest_code fp32 d=130 tf32x3 (d-slices)", lambda: nearest_code.triton_nearest_code(
            _randn(4096, 130), _randn(1024, 130), True), (90,), search=True),
        Case("nearest_code bf16 x, fp32 codebook d=64 tf32x3", lambda: nearest_code.triton_nearest_code(
            _randn(4096, 64, dtype=bf16), _randn(1024, 64), True), (90,), search=True),
        Case("nearest_code fp32 d=33 ieee", at_precision("ieee", lambda: nearest_code.triton_nearest_code(
            _randn(4096, 33), _randn(1024, 33), True)), search=True),
        Case("nearest_code fp32 d=130 ieee (d-slices)", at_precision("ieee", lambda: nearest_code.triton_nearest_code(
            _randn(4096, 130), _randn(1024, 130), True)), (90,), search=True),
        # N = 256 rows cannot fill the SMs: the launcher splits over codes (nearest_code_split.py).
        Case("nearest_code split bf16 d=64 N=256 K=65536", lambda: nearest_code.triton_nearest_code(
            _randn(256, 64, dtype=bf16), _randn(65536, 64, dtype=bf16), True), search=True,
            target=TARGET_PER_ELEMENT),
        Case("nearest_code split bf16 d=256 N=256 K=65536", lambda: nearest_code.triton_nearest_code(
            _randn(256, 256, dtype=bf16), _randn(65536, 256, dtype=bf16), True), (90,), search=True),
        Case("nearest_code split fp32 d=33 N=256 K=8192 tf32x3", lambda: nearest_code.triton_nearest_code(
            _randn(256, 33), _randn(8192, 33), True), search=True),
        Case("nearest_code split fp32 d=33 N=256 K=8192 ieee", at_precision(
            "ieee", lambda: nearest_code.triton_nearest_code(_randn(256, 33), _randn(8192, 33), True)), (90,),
            search=True),
        # The opt-in Gluon search (nearest_code_gluon.py): its point is the overlap, so the check asks for it.
        Case("nearest_code gluon bf16 d=64 (pipelined wgmma)", lambda: _gluon_search(4096, 1024, 64), (90,),
             search=True, target=TARGET_PER_ELEMENT, overlap=True),
        Case("nearest_code gluon bf16 d=33 N=256 K=65536 (split)", lambda: _gluon_search(256, 65536, 33), (90,),
             search=True, target=TARGET_PER_ELEMENT, overlap=True),
        Case("nearest_code split epilogue bf16 d=64", lambda: nearest_code_split.split_epilogue(
            *_split_epilogue_args(bf16))),
        Case("nearest_codes bf16 d=64 k=8", lambda: nearest_codes.triton_nearest_codes(
            _randn(4096, 64, dtype=bf16), _randn(1024, 64, dtype=bf16), 8), search=True, skip_path=True),
        Case("nearest_codes fp32 d=33 k=64 tf32x3", lambda: nearest_codes.triton_nearest_codes(
            _randn(4096, 33), _randn(1024, 33), 64), search=True, skip_path=True),
        Case("nearest_codes fp32 d=33 k=64 ieee", at_precision("ieee", lambda: nearest_codes.triton_nearest_codes(
            _randn(4096, 33), _randn(1024, 33), 64)), (90,), search=True, skip_path=True),
        Case("ema_stats bf16 d=64", lambda: ema_stats.triton_ema_stats(
            _randn(4096, 64, dtype=bf16), rows, 1024)),
        Case("quantize_backward fp16 d=128", lambda: quantize_backward.triton_quantize_backward(
            x16, x16, _randn(1024, 128, dtype=fp16), rows, torch.tensor(0.25), torch.tensor(1.0), True, True)),
        Case("quantize_backward bf16 d=128 rotation trick", lambda: quantize_backward.triton_quantize_backward(
            x16.to(bf16), x16.to(bf16), _randn(1024, 128, dtype=bf16), rows, torch.tensor(0.25), torch.tensor(1.0),
            True, True, True), (90,)),
        Case("segment_sum fp32 d=128 residual", lambda: segment_sum.segment_sum(
            x32, *sort_by_code(rows, 1024), 1024, codebook=_randn(1024, 128))),
    ]


def at_precision(precision: str, call: Callable[[], object]) -> Callable[[], object]:
    """``call`` with float32 operands at ``precision`` (fastvq.triton.set_fp32_precision), then the setting back."""
    def run():
        before = _jit._options["fp32_precision"]
        _jit.set_fp32_precision(precision)
        try:
            return call()
        finally:
            _jit.set_fp32_precision(before)
    return run


def _gluon_search(num_rows: int, num_codes: int, dim: int):
    x, codebook = _randn(num_rows, dim, dtype=torch.bfloat16), _randn(num_codes, dim, dtype=torch.bfloat16)
    centre, codes, pieces, _ = nearest_code.centred_codebook(codebook, torch.bfloat16, fold_norms=True)
    return nearest_code_gluon.search_keys(x, centre, codes, pieces, num_codes, nearest_code_split.STAND_IN_SM_COUNT)


def _split_epilogue_args(dtype):
    x, codebook = _randn(256, 64, dtype=dtype), _randn(65536, 64, dtype=dtype)
    keys = torch.zeros(256, dtype=torch.int64)
    return (x, torch.zeros(64), codebook, keys, torch.empty_like(keys), torch.empty(256), torch.empty_like(x),
            torch.tensor([65536, 256]), True)


def capture(call: Callable[[], object]) -> _jit.Captured:
    with _jit.capture_launches():
        try:
            call()
        except _jit.Captured as captured:
            return captured
    raise RuntimeError("the launcher launched no kernel")


def compile_launch(captured: _jit.Captured, arch: int, config_kwargs: dict):
    """Compile the captured launch for sm_<arch> as Triton's launcher would (JITFunction.run)."""
    fn = captured.kernel.fn if isinstance(captured.kernel, Autotuner) else captured.kernel
    kwargs = {**captured.kwargs, **config_kwargs, "debug": False,
              "instrumentation_mode": knobs.compilation.instrumentation_mode,
              "fpsan_homomorphic_casts": knobs.compilation.fpsan_homomorphic_casts}
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*captured.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    source = GluonASTSource if isinstance(fn, GluonJITFunction) else ASTSource
    return triton.compile(source(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    bundled = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else "cuobjdump"


def cubin_report(cubin: bytes) -> tuple[dict[str, int], str]:
    """({REG, STACK, LOCAL, SHARED}, SASS text) of a one-kernel cubin, by cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", file.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_cuobjdump(), "--dump-sass", file.name], capture_output=True, text=True,
                              check=True).stdout
    resources = {name: int(value) for name, value in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", usage)}
    return resources, sass


def full_wgmma_rows(config: dict) -> bool:
    return config["BLOCK_N"] >= WGMMA_ROWS * config["num_warps"] // 4


def resident_programs(arch: int, registers: int, num_warps: int, shared: int) -> int:
    """Programs (CTAs) of one kernel that fit on one SM at once, by registers, shared memory and warps."""
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    warps_by_registers = SUBPARTITIONS * (REGISTERS_PER_SUBPARTITION // per_warp)
    per_program_shared = -(-(shared + SHARED_RESERVED) // SHARED_UNIT) * SHARED_UNIT
    return min(warps_by_registers // num_warps, SHARED_PER_SM[arch] // per_program_shared,
               MAX_WARPS_PER_SM // num_warps, MAX_PROGRAMS_PER_SM)


def problems_of(case: Case, arch: int, config: dict, shared: int, stack: int, cost: float | None,
                resident: int, wgmma_waits: list[int] | None = None) -> list[str]:
    """Why one compiled config fails the check (empty: it passes); ``resident``: programs per SM;
    ``wgmma_waits``: main_loop_wgmma_waits of the SASS."""
    problems = []
    if case.overlap and arch == 90 and (not wgmma_waits or min(wgmma_waits) == 0):
        problems.append(f"main loop waits for every wgmma group (DEPBAR levels {wgmma_waits}): no overlap")
    if shared > SHARED_LIMIT[arch]:
        problems.append(f"{shared} B shared memory > the {SHARED_LIMIT[arch]} B limit")
    if stack:
        problems.append(f"spills ({stack} B of stack)")
    if case.target is not None and arch == 90 and full_wgmma_rows(config):
        if cost is None or cost > case.target:
            problems.append(f"main loop {cost} SASS/score element, target <= {case.target}")
        warpgroups = resident * (config["num_warps"] // 4)
        if warpgroups < MIN_RESIDENT_WARPGROUPS:
            problems.append(f"{warpgroups} warpgroup(s) per SM ({resident} program(s)), need >= "
                            f"{MIN_RESIDENT_WARPGROUPS} so one's wgmma overlaps another's epilogue")
    return problems


def search_cost(captured: _jit.Captured, config_kwargs: dict, sass: str, skipping: bool = False) -> float | None:
    kwargs = {**captured.kwargs, **config_kwargs}
    fn = captured.kernel.fn if isinstance(captured.kernel, Autotuner) else captured.kernel
    if isinstance(fn, GluonJITFunction):  # nearest_code_gluon: two whole tiles a loop step, x resident
        body = main_loop_instructions(sass, 1)
        if body is None:
            return None
        return body * kwargs["num_warps"] * 32 / (nearest_code_gluon.TILES_PER_STEP * kwargs["BLOCK_N"]
                                                  * nearest_code_gluon.BLOCK_K)
    dim = captured.args[fn.arg_names.index("d")]
    body = main_loop_instructions(sass, -(-dim // kwargs["BLOCK_D"]) if not kwargs["X_RESIDENT"] else 1, skipping)
    if body is None:
        return None
    return body * kwargs["num_warps"] * 32 / (kwargs["BLOCK_N"] * kwargs["BLOCK_K"])


def configs_for(captured: _jit.Captured, everything: bool) -> list[dict]:
    if not isinstance(captured.kernel, Autotuner):
        return [{}]  # the launch's own kwargs
    spec = captured.kernel._fastvq_spec
    fn = captured.kernel.fn
    configs = spec.configs
    if spec.prune is not None:  # the configs the autotuner would try for this launch
        configs = spec.prune(configs, dict(zip(fn.arg_names, captured.args)), **captured.kwargs)
    if everything:
        return [_jit.config_kwargs(c) for c in configs]
    large = [c for c in configs if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) == (128, 64, 8)]
    return [_jit.config_kwargs(c) for c in [spec.fixed_config(captured.kwargs), *large]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="compile every autotune config of the search")
    args = parser.parse_args(argv)
    if _jit.interpreting():
        print("TRITON_INTERPRET is set: run compile_check in a process without it")
        return 2
    failures = 0
    start = time.perf_counter()
    for case in default_cases():
        captured = capture(case.call)
        for config in configs_for(captured, args.all):
            launch_config = {**captured.kwargs, **config}
            shown = {k: v for k, v in launch_config.items()
                     if k in ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "STAGES")}
            for arch in case.archs:
                began = time.perf_counter()
                label = f"sm_{arch} {case.label} {shown or ''}".rstrip()
                try:
                    compiled = compile_launch(captured, arch, config)
                    resources, sass = cubin_report(compiled.asm["cubin"])
                except Exception as error:  # report every failure, then exit non-zero
                    failures += 1
                    print(f"FAIL {label}: {type(error).__name__}: {error}")
                    continue
                shared, stack = compiled.metadata.shared, resources.get("STACK", 0) + resources.get("LOCAL", 0)
                cost = search_cost(captured, config, sass) if case.search else None
                resident = resident_programs(arch, resources.get("REG", 255), compiled.metadata.num_warps, shared)
                waits = main_loop_wgmma_waits(sass) if case.overlap else None
                problems = problems_of(case, arch, launch_config, shared, stack, cost, resident, waits)
                per_element = f", {cost:.2f} SASS/score element in the main loop" if cost is not None else ""
                if waits:
                    per_element += f", wgmma waits leave {sorted(set(waits))} groups in flight"
                skip_cost = search_cost(captured, config, sass, skipping=True) if case.skip_path else None
                if skip_cost is not None:
                    per_element += f" ({skip_cost:.2f} when a tile enters no row's list)"
                failures += bool(problems)
                print(f"{'FAIL' if problems else 'ok  '} {label}: {resources.get('REG')} registers, {stack} B stack, "
                      f"{shared} B shared, {resident} programs/SM{per_element}, {time.perf_counter() - began:.1f} s"
                      + (f" -- {'; '.join(problems)}" if problems else ""))
    print(f"{'FAILED' if failures else 'all compiled, no spills'} in {time.perf_counter() - start:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
