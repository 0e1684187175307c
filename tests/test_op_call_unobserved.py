"""fastvq.quantize, nearest_code and nearest_codes call the search ops' bodies directly when nothing watches
(ops.op_call_is_unobserved): the same outputs as through the custom op, and the op whenever anything could see
the difference (autograd, torch.compile, torch.jit.trace, dispatch and torch-function modes, the profiler,
functorch, meta tensors, tensor subclasses)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastvq
from fastvq import ops

from conftest import non_contiguous_rows

SEARCHES = {  # public function -> the op it goes through when watched
    "quantize": (lambda x, c, backend: fastvq.quantize(x, c, backend=backend), "quantize"),
    "nearest_code": (lambda x, c, backend: fastvq.nearest_code(x, c, backend=backend), "nearest_code"),
    "nearest_code hinted": (lambda x, c, backend: fastvq.nearest_code(
        x, c, backend=backend, hint=torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)), "nearest_code"),
    "nearest_codes": (lambda x, c, backend: fastvq.nearest_codes(x, c, 3, backend=backend), "nearest_codes"),
}


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls of each search op object that fastvq.functional makes."""
    calls = {name: 0 for name in ("quantize", "nearest_code", "nearest_codes")}
    for name in calls:
        op = getattr(ops, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            calls[_name] += 1
            return _op(*args, **kwargs)
        monkeypatch.setattr(ops, name, counted)
    return calls


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("rows", [0, 1, 33, 257])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_the_direct_call_gives_the_ops_outputs(pair, monkeypatch, search, rows, layout):
    generator = torch.Generator().manual_seed(rows)
    codebook = pair.to(torch.randn(40, 8, generator=generator))
    x = (non_contiguous_rows(pair, "transposed", rows, 8, generator) if layout == "transposed"
         else pair.to(torch.randn(rows, 8, generator=generator)))
    call, _ = SEARCHES[search]
    direct = call(x, codebook, pair.backend)
    monkeypatch.setattr(ops, "op_call_is_unobserved", lambda *tensors: False)
    through_op = call(x, codebook, pair.backend)
    for mine, theirs in zip(direct, through_op):
        assert mine.shape == theirs.shape and mine.dtype == theirs.dtype and mine.device == theirs.device
        assert mine.is_contiguous() == theirs.is_contiguous()
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("search", SEARCHES)
def test_an_unwatched_call_skips_the_op_and_a_gradient_takes_it(op_calls, search):
    call, op = SEARCHES[search]
    x, codebook = torch.randn(5, 8), torch.randn(16, 8)
    call(x, codebook, "auto")
    with torch.no_grad():
        call(x.requires_grad_(), codebook, "auto")
    assert op_calls[op] == 0
    if search == "quantize":  # the only search with a gradient
        call(x, codebook, "auto")[0].sum().backward()
        assert op_calls[op] == 1 and x.grad is not None


class _Recording(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _PassingThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    pass


WATCHERS = {
    "dispatch mode": lambda: _Recording(),
    "torch-function mode": lambda: _PassingThrough(),
    "profiler": lambda: torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]),
}


@pytest.mark.parametrize("watcher", WATCHERS)
@pytest.mark.parametrize("search", SEARCHES)
def test_a_watched_call_takes_the_op(op_calls, search, watcher):
    call, op = SEARCHES[search]
    x, codebook = torch.randn(5, 8), torch.randn(16, 8)
    with WATCHERS[watcher]():
        call(x, codebook, "auto")
    assert op_calls[op] == 1


@pytest.mark.parametrize("search", SEARCHES)
def test_meta_tensors_and_subclasses_take_the_op(op_calls, search):
    call, op = SEARCHES[search]
    call(torch.empty(5, 8, device="meta"), torch.empty(16, 8, device="meta"), "auto")
    call(torch.randn(5, 8).as_subclass(_Subclass), torch.randn(16, 8), "auto")
    assert op_calls[op] == 2


@pytest.mark.parametrize("search", SEARCHES)
def test_a_jit_trace_records_the_op(search):
    call, op = SEARCHES[search]
    codebook = torch.randn(16, 8)
    # the argument checks read shapes, which the trace fixes; torch.jit.trace is deprecated, and still used
    with pytest.warns(torch.jit.TracerWarning), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(lambda x: call(x, codebook, "auto")[1], (torch.randn(5, 8),), check_trace=False)
    assert f"fastvq::{op}" in str(traced.graph)
    x = torch.randn(5, 8)
    torch.testing.assert_close(traced(x), call(x, codebook, "auto")[1], rtol=0, atol=0)


def test_compiling_and_functorch_are_watchers():
    x = torch.randn(4, 8)
    assert ops.op_call_is_unobserved(x)
    inside_vmap = torch.func.vmap(lambda row: row * ops.op_call_is_unobserved(row))(x)
    torch.testing.assert_close(inside_vmap, torch.zeros_like(x), rtol=0, atol=0)
    compiled = torch.compile(lambda row: row * ops.op_call_is_unobserved(row), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), torch.zeros_like(x), rtol=0, atol=0)
    assert ops.op_call_is_unobserved(x, None)  # an absent optional tensor


def test_an_evaluating_quantizer_searches_directly_unless_watched(op_calls):
    module = fastvq.FastVectorQuantizer(8, 16).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        direct = module(x)
    assert op_calls["nearest_code"] == 0
    with _Recording(), torch.no_grad():
        watched = module(x)
    assert op_calls["nearest_code"] == 1
    for mine, theirs in zip(direct[:2], watched[:2]):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
