"""The Triton kernels against fastvq.reference: on CUDA tensors when a GPU is present,
otherwise on CPU tensors through Triton's interpreter.

Triton reads TRITON_INTERPRET when a function is decorated, and its own library
(tl.zeros, tl.sum, tl.min, ...) is decorated when triton is first imported. So on a
machine without CUDA this module imports triton with TRITON_INTERPRET=1 and restores
the variable at once; the module-scoped fixture then sets it only while these tests
run. fastvq.triton re-decorates its own kernels for the mode in force at launch, so it
does not matter when fastvq.triton was imported.

In a full test run something imports triton earlier, without the interpreter
(importing torch._dynamo does). Then the tests here cannot run in this process: they
are skipped here and test_interpreter_tests_in_a_fresh_process runs this file in a new
process instead, failing if any test there fails. What the interpreter cannot check
(tensor-core tl.dot, atomics, register and shared-memory limits) is covered by
test_kernels_compile_for_gpus, which compiles the kernels to sm_80/sm_90 cubins.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def _import_triton_for_the_interpreter():
    if ON_GPU or "triton" in sys.modules:
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


_import_triton_for_the_interpreter()
triton = pytest.importorskip("triton")

import fastvq  # noqa: E402
from fastvq import dispatch, reference  # noqa: E402
from fastvq.nn import FastVectorQuantizer  # noqa: E402

from conftest import TOLERANCES, assert_nearest, exact_inputs_with_duplicate_codes, exact_sqdist  # noqa: E402

# True when triton's library was decorated for the interpreter, so CPU tensors can run here.
RUNS_HERE = ON_GPU or type(triton.language.zeros).__name__ == "InterpretedFunction"
FRESH_PROCESS_TEST = "test_interpreter_tests_in_a_fresh_process"
requires_cpu = pytest.mark.skipif(ON_GPU, reason="checks interpreter-mode behaviour on CPU tensors")


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    if not RUNS_HERE:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        if ON_GPU:
            patch.delenv("TRITON_INTERPRET", raising=False)
        else:
            patch.setenv("TRITON_INTERPRET", "1")
        patch.delenv("FASTVQ_DETERMINISTIC", raising=False)
        patch.delenv("FASTVQ_TRITON_TF32", raising=False)
        patch.delenv("FASTVQ_BACKEND", raising=False)
        yield


FRESH_PROCESS_ENV = "FASTVQ_TRITON_TESTS_IN_FRESH_PROCESS"


@pytest.fixture(autouse=True)
def _in_this_process_or_the_fresh_one(request):
    if RUNS_HERE or request.node.originalname == FRESH_PROCESS_TEST:
        return
    if os.environ.get(FRESH_PROCESS_ENV):
        pytest.fail("even a fresh process imported triton without TRITON_INTERPRET=1 before this module "
                    "(conftest or fastvq now imports it, e.g. through torch._dynamo)")
    pytest.skip(f"triton was imported without TRITON_INTERPRET=1 before this module; {FRESH_PROCESS_TEST} "
                "runs these tests in a new process")


@pytest.mark.skipif(RUNS_HERE or bool(os.environ.get(FRESH_PROCESS_ENV)), reason="this process runs the tests itself")
def test_interpreter_tests_in_a_fresh_process():
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "FASTVQ_DETERMINISTIC", "FASTVQ_TRITON_TF32", "FASTVQ_BACKEND")}
    env[FRESH_PROCESS_ENV] = "1"
    here = Path(__file__).resolve()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here)],
                            cwd=here.parents[1], env=env, capture_output=True, text=True, timeout=1200)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0 and " passed" in summary, result.stdout[-8000:] + result.stderr[-4000:]


@pytest.fixture(params=["atomic", "deterministic"])
def reduction(request, monkeypatch):
    use_reduction(monkeypatch, request.param)
    return request.param


def use_reduction(monkeypatch, reduction: str) -> None:
    monkeypatch.setenv("FASTVQ_DETERMINISTIC", "1" if reduction == "deterministic" else "0")


# The reduction path does not depend on the input dtype, so under the (slow) interpreter
# the deterministic path runs on float32 only.
REDUCTION_DTYPES = [("atomic", torch.float32), ("atomic", torch.bfloat16), ("atomic", torch.float16),
                    ("deterministic", torch.float32)]
if ON_GPU:
    REDUCTION_DTYPES += [("deterministic", torch.bfloat16), ("deterministic", torch.float16)]


def randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def run(op, *args):
    """Run a torch.ops.fastvq op with tensor args moved to DEVICE; results come back on the CPU."""
    moved = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    out = op(*moved)
    return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()


HALF_DTYPES = (torch.bfloat16, torch.float16)


def nearest(x, codebook):
    return run(lambda a, b: fastvq.nearest_code(a, b, backend="triton"), x, codebook)


def quantize(x, codebook):
    quantized, indices, _ = run(torch.ops.fastvq.quantize, x, codebook, 0.0, 0.0, "triton")
    return quantized, indices


# ---- nearest_code / quantize forward --------------------------------------------------------
SEARCH_SHAPES = [  # (N, K, d): each of N in {0,1,7,300}, K in {1,3,257}, d in {1,3,33,64}
    (0, 3, 33), (1, 1, 1), (1, 257, 64), (7, 3, 3), (7, 257, 33), (7, 1, 64), (300, 1, 3), (300, 3, 64),
    (300, 257, 33), (300, 257, 1),
]


@pytest.mark.parametrize("num_rows,num_codes,dim", SEARCH_SHAPES)
def test_nearest_code_random_inputs_by_distance(num_rows, num_codes, dim):
    x = randn(num_rows, dim, seed=num_rows + dim)
    codebook = randn(num_codes, dim, seed=num_codes)
    indices, sqdist = nearest(x, codebook)
    assert sqdist.dtype == torch.float32 and sqdist.shape == (num_rows,)
    assert_nearest(x, codebook, indices)
    torch.testing.assert_close(sqdist.double(), exact_sqdist(x, codebook, indices), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("num_rows,num_codes,dim", [(7, 3, 3), (300, 257, 33), (300, 3, 64)])
def test_nearest_code_half_inputs_by_distance(dtype, num_rows, num_codes, dim):
    # bf16/fp16 values and their products are exact in float32, so the float32 slack applies.
    x = randn(num_rows, dim, seed=dim, dtype=dtype)
    codebook = randn(num_codes, dim, seed=num_codes + 1, dtype=dtype)
    indices, sqdist = nearest(x, codebook)
    assert_nearest(x, codebook, indices)
    torch.testing.assert_close(sqdist.double(), exact_sqdist(x, codebook, indices), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", (torch.float32,) + HALF_DTYPES)
@pytest.mark.parametrize("num_rows,num_codes,dim", [(1, 1, 1), (7, 3, 3), (300, 257, 33), (300, 257, 64)])
def test_nearest_code_exact_inputs_with_duplicate_codes(dtype, num_rows, num_codes, dim):
    x, codebook = exact_inputs_with_duplicate_codes(num_rows, num_codes, dim, seed=num_codes + dim)
    x, codebook = x.to(dtype), codebook.to(dtype)
    expected_indices, expected_sqdist = reference.nearest_code(x.double(), codebook.double())
    quantized, indices = quantize(x, codebook)
    torch.testing.assert_close(indices, expected_indices, rtol=0, atol=0)
    torch.testing.assert_close(quantized, codebook[expected_indices], rtol=0, atol=0)
    indices, sqdist = nearest(x, codebook)
    torch.testing.assert_close(indices, expected_indices, rtol=0, atol=0)
    torch.testing.assert_close(sqdist, expected_sqdist.float(), rtol=0, atol=0)


def test_nearest_code_ties_go_to_lowest_index_across_tiles():
    # 257 codes span several codebook tiles; the nearest code is repeated far apart.
    codebook = 10.0 + torch.arange(257 * 3, dtype=torch.float32).reshape(257, 3)
    target = torch.tensor([1.0, 2.0, 3.0])
    for position in (70, 140, 256):
        codebook[position] = target
    x = torch.stack([target, target + 0.25, torch.zeros(3)])
    indices, _ = nearest(x, codebook)
    assert indices.tolist() == [70, 70, 70]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
def test_nearest_code_non_finite_rule():
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
    quantized, indices = quantize(x, codebook)
    torch.testing.assert_close(indices, expected_indices, rtol=0, atol=0)
    assert indices[2:5].tolist() == [0, 0, 0] and int(indices[1]) > 2
    torch.testing.assert_close(quantized, codebook[expected_indices], rtol=0, atol=0, equal_nan=True)
    _, sqdist = nearest(x, codebook)
    torch.testing.assert_close(sqdist, expected_sqdist, equal_nan=True, **TOLERANCES[torch.float32])


def test_nearest_code_every_code_non_finite_gives_index_zero():
    indices, _ = nearest(randn(7, 4, seed=0), torch.full((3, 4), float("nan")))
    assert indices.tolist() == [0] * 7


@pytest.mark.parametrize("layout", ["transposed", "row_step", "column_slice"])
def test_nearest_code_non_contiguous(layout):
    generator = torch.Generator().manual_seed(5)
    codebook = torch.randn(257, 33, generator=generator)
    base, view = {
        "transposed": (torch.randn(33, 300, generator=generator), lambda t: t.t()),
        "row_step": (torch.randn(600, 33, generator=generator), lambda t: t[::2]),
        "column_slice": (torch.randn(300, 66, generator=generator), lambda t: t[:, 5:38]),
    }[layout]
    x = view(base.to(DEVICE))  # made non-contiguous on the device itself
    column_major = codebook.t().contiguous().t().to(DEVICE)
    assert not x.is_contiguous() and not column_major.is_contiguous() and x.shape == (300, 33)
    quantized, indices, _ = (t.cpu() for t in torch.ops.fastvq.quantize(x, column_major, 0.0, 0.0, "triton"))
    x = x.cpu()
    expected, _ = reference.nearest_code(x, codebook)
    assert_nearest(x, codebook, indices)
    torch.testing.assert_close(indices, expected, rtol=0, atol=0)  # random codes: no near-ties
    torch.testing.assert_close(quantized, codebook[indices], rtol=0, atol=0)


def test_quantize_mixed_dtypes_returns_x_dtype():
    x = randn(7, 33, seed=1, dtype=torch.bfloat16)
    codebook = randn(257, 33, seed=2)
    quantized, indices = quantize(x, codebook)
    assert quantized.dtype == torch.bfloat16
    assert_nearest(x, codebook, indices)
    torch.testing.assert_close(quantized, codebook[indices].to(torch.bfloat16), rtol=0, atol=0)


def test_triton_op_handles_zero_rows_directly():
    indices, sqdist, quantized = run(torch.ops.fastvq.triton_nearest_code, torch.empty(0, 3), randn(5, 3, seed=0), True)
    assert indices.shape == sqdist.shape == (0,) and quantized.shape == (0, 3)


# ---- quantize_backward ----------------------------------------------------------------------
@pytest.mark.parametrize("reduction,dtype", REDUCTION_DTYPES)
@pytest.mark.parametrize("num_rows,num_codes,dim", [(1, 1, 1), (7, 3, 3), (300, 257, 33), (300, 3, 64)])
def test_quantize_backward_matches_reference(monkeypatch, reduction, dtype, num_rows, num_codes, dim):
    use_reduction(monkeypatch, reduction)
    x = randn(num_rows, dim, seed=dim, dtype=dtype)
    codebook = randn(num_codes, dim, seed=num_codes, dtype=dtype)
    indices = torch.randint(0, num_codes, (num_rows,), generator=torch.Generator().manual_seed(num_rows))
    grad_q = randn(1, dim, seed=7, dtype=dtype).to(DEVICE).expand(num_rows, dim)  # stride 0, as autograd may pass
    commit_scale, codebook_scale = torch.tensor(0.37), torch.tensor(-1.3)
    grad_x, grad_codebook = run(torch.ops.fastvq.quantize_backward,
                                grad_q, x, codebook, indices, commit_scale, codebook_scale, "triton", True)
    grad_q = grad_q.cpu()
    want_x, want_codebook = reference.quantize_backward(grad_q, x, codebook, indices, commit_scale, codebook_scale)
    assert grad_x.dtype == grad_codebook.dtype == dtype
    torch.testing.assert_close(grad_x, want_x, **TOLERANCES[dtype])
    torch.testing.assert_close(grad_codebook, want_codebook, **TOLERANCES[dtype])
    if dtype == torch.float32:  # and against float64 arithmetic
        want64_x, want64_codebook = reference.quantize_backward(
            grad_q.double(), x.double(), codebook.double(), indices, commit_scale, codebook_scale)
        torch.testing.assert_close(grad_x.double(), want64_x, **TOLERANCES[torch.float32])
        torch.testing.assert_close(grad_codebook.double(), want64_codebook, **TOLERANCES[torch.float32])


def test_quantize_backward_without_codebook_gradient():
    x, codebook = randn(300, 33, seed=1), randn(3, 33, seed=2)
    indices = torch.randint(0, 3, (300,), generator=torch.Generator().manual_seed(0))
    grad_x, grad_codebook = run(torch.ops.fastvq.triton_quantize_backward,
                                x, x, codebook, indices, torch.tensor(0.5), torch.tensor(2.0), True, False)
    assert grad_codebook.shape == (0,)
    torch.testing.assert_close(grad_x, x + 0.5 * (x - codebook[indices]), **TOLERANCES[torch.float32])


def test_fused_quantize_gradients_through_autograd():
    x0, e0 = randn(300, 33, seed=11), randn(257, 33, seed=12)
    upstream = randn(300, 33, seed=13)

    def train_step(fn, device):
        x = x0.to(device).requires_grad_()
        codebook = e0.to(device).requires_grad_()
        quantized, indices, loss = fn(x, codebook)
        ((quantized * upstream.to(device)).sum() + 1.7 * loss).backward()
        return tuple(t.detach().cpu() for t in (quantized, indices, loss, x.grad, codebook.grad))

    got = train_step(lambda x, e: torch.ops.fastvq.quantize(x, e, 0.25, 1.0, "triton"), DEVICE)
    want = train_step(lambda x, e: reference.quantize(x, e, 0.25, 1.0), "cpu")
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    for got_value, want_value in zip(got[:1] + got[2:], want[:1] + want[2:]):
        torch.testing.assert_close(got_value, want_value, **TOLERANCES[torch.float32])


# ---- ema_stats and the EMA step -------------------------------------------------------------
@pytest.mark.parametrize("reduction,dtype", REDUCTION_DTYPES)
@pytest.mark.parametrize("num_rows,num_codes,dim", [(0, 3, 33), (1, 1, 1), (7, 3, 3), (300, 257, 33), (300, 3, 64)])
def test_ema_stats_matches_reference(monkeypatch, reduction, dtype, num_rows, num_codes, dim):
    use_reduction(monkeypatch, reduction)
    x = randn(num_rows, dim, seed=num_rows + dim, dtype=dtype)
    indices = torch.randint(0, num_codes, (num_rows,), generator=torch.Generator().manual_seed(num_codes))
    counts, sums = run(lambda a, b: fastvq.ema_stats(a, b, num_codes, backend="triton"), x, indices)
    want_counts, want_sums = reference.ema_stats(x.double(), indices, num_codes)
    assert counts.dtype == sums.dtype == torch.float32 and sums.shape == (num_codes, dim)
    torch.testing.assert_close(counts.double(), want_counts, rtol=0, atol=0)
    # A float32 sum of n terms errs by at most (n − 1)·u·Σ|x_i|.
    _, abs_sums = reference.ema_stats(x.double().abs(), indices, num_codes)
    bound = want_counts.clamp(min=1).unsqueeze(1) * 2.0**-24 * abs_sums
    assert bool(((sums.double() - want_sums).abs() <= bound).all())


def test_ema_stats_non_contiguous_and_skewed(reduction):
    x = randn(33, 600, seed=2).to(DEVICE).t()[::2]  # (300, 33), strides (2, 600)
    indices = torch.zeros(300, dtype=torch.int64)
    indices[::50] = 2  # almost every row on one code: a collapsed codebook
    counts, sums = (t.cpu() for t in fastvq.ema_stats(x, indices.to(DEVICE), 3, backend="triton"))
    want_counts, want_sums = reference.ema_stats(x.cpu().double(), indices, 3)
    torch.testing.assert_close(counts.double(), want_counts, rtol=0, atol=0)
    torch.testing.assert_close(sums.double(), want_sums, **TOLERANCES[torch.float32])


def test_out_of_range_indices_are_ignored_not_written(reduction):
    # fastvq.functional rejects them; the kernels still never write outside (K, d).
    x = randn(7, 3, seed=0)
    indices = torch.tensor([0, 3, 1, -1, 2, 99, 0])
    counts, sums = run(torch.ops.fastvq.triton_ema_stats, x, indices, 3)
    keep = (indices >= 0) & (indices < 3)
    want_counts, want_sums = reference.ema_stats(x[keep], indices[keep], 3)
    torch.testing.assert_close(counts, want_counts, rtol=0, atol=0)
    torch.testing.assert_close(sums, want_sums, **TOLERANCES[torch.float32])
    grad_x, grad_codebook = run(torch.ops.fastvq.triton_quantize_backward,
                                x, x, randn(3, 3, seed=1), indices, torch.tensor(1.0), torch.tensor(1.0), True, True)
    assert bool(torch.isfinite(grad_x).all()) and bool(torch.isfinite(grad_codebook).all())


def test_deterministic_mode_is_bitwise_reproducible(monkeypatch):
    monkeypatch.setenv("FASTVQ_DETERMINISTIC", "1")
    x, codebook = randn(300, 33, seed=5), randn(3, 33, seed=6)
    indices = torch.randint(0, 3, (300,), generator=torch.Generator().manual_seed(1))
    scales = (torch.tensor(0.1), torch.tensor(0.2))
    for op, args in [(torch.ops.fastvq.triton_ema_stats, (x, indices, 3)),
                     (torch.ops.fastvq.triton_quantize_backward, (x, x, codebook, indices, *scales, True, True))]:
        first, second = run(op, *args), run(op, *args)
        for a, b in zip(first, second):
            assert torch.equal(a, b)


def test_ema_module_steps_match_reference():
    dim, codebook_size = 33, 257
    torch.manual_seed(0)
    module = FastVectorQuantizer(dim, codebook_size, decay=0.9, backend="triton").train()
    state = [module.embed.clone(), module.cluster_size.clone(), module.embed_avg.clone()]
    module.to(DEVICE)
    for step in range(2):
        batch = randn(300, dim, seed=100 + step)
        quantized, indices, loss = (t.detach().cpu() for t in module(batch.to(DEVICE).requires_grad_()))
        want_quantized, want_indices, want_loss = reference.ema_vq_step(
            batch, *state, decay=0.9, eps=1e-5, commitment_weight=0.25)
        torch.testing.assert_close(indices, want_indices, rtol=0, atol=0)
        # After the first step the codebooks differ by float32 summation order only.
        torch.testing.assert_close(quantized, want_quantized, **TOLERANCES[torch.float32])
        torch.testing.assert_close(loss, want_loss, **TOLERANCES[torch.float32])
        for got, want in zip((module.embed, module.cluster_size, module.embed_avg), state):
            torch.testing.assert_close(got.cpu(), want, **TOLERANCES[torch.float32])


# ---- the backend, its options and its reasons ------------------------------------------------
@requires_cpu
def test_backend_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    reasons = dispatch.get_backend("triton").not_supported_reasons(torch.empty(1, 1))
    assert reasons == ["device cpu: triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1"]
    with pytest.raises(dispatch.BackendNotSupportedError, match="TRITON_INTERPRET=1"):
        fastvq.nearest_code(torch.zeros(2, 2), torch.zeros(2, 2), backend="triton")


def test_backend_reasons_and_description():
    backend = dispatch.get_backend("triton")
    assert backend.unavailable_reason() is None
    probe = torch.empty(1, 1, device=DEVICE)
    assert backend.not_supported_reasons(probe, probe.to(torch.bfloat16)) == []
    assert backend.not_supported_reasons(probe.double()) == ["dtype float64: triton supports float32, bfloat16, float16"]
    assert ("CUDA tensors" if ON_GPU else "TRITON_INTERPRET=1") in backend.describe()
    assert dispatch.resolve("auto", torch.empty(1, 1)).name != "triton"  # never auto on CPU


@requires_cpu
def test_kernels_follow_the_interpreter_setting_at_launch(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from fastvq.triton import _jit, nearest_code

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
    monkeypatch.setenv("FASTVQ_DETERMINISTIC", "0")
    assert not fvt.deterministic()
    torch.use_deterministic_algorithms(True)
    try:
        assert fvt.deterministic()
    finally:
        torch.use_deterministic_algorithms(False)


def test_kernels_compile_for_gpus():
    # A fresh process: this one's triton library may be in interpreter mode.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "fastvq.triton.compile_check"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
