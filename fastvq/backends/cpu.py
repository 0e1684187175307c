"""The ``cpu`` backend: the fused C++ kernels of ``fastvq._cpu`` (OpenMP + AVX2).

The kernels compute in float32 on C-contiguous arrays. This wrapper converts inputs
(copying only when needed), allocates the outputs with torch, passes
``torch.get_num_threads()`` to the kernels and converts outputs back to the input dtype.
"""
from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections import OrderedDict

import torch
from torch import Tensor

from ..numerics import KERNEL_DTYPE_NAMES
from .base import Backend

# Caps the SIMD level the kernels use (portable, avx2, avx512); for benchmarks that must run
# as on an older CPU. Unset: the best level this CPU supports.
SIMD_ENV_VAR = "FASTVQ_CPU_SIMD"
# nearest_code's int8 prefilter (exact; AVX-512 VNNI, AMX-INT8 or AVX2): auto (default), always or off (_cpu.set_prefilter).
PREFILTER_ENV_VAR = "FASTVQ_CPU_PREFILTER"

try:
    from .. import _cpu
except ImportError as error:  # surfaced by unavailable_reason(), fastvq.info and forced-backend errors
    _cpu = None
    _IMPORT_ERROR: str | None = f"fastvq._cpu failed to import ({error}); build it with `pip install -e .`"
else:
    _IMPORT_ERROR = None
    for _variable, _setter in ((SIMD_ENV_VAR, _cpu.set_simd_level), (PREFILTER_ENV_VAR, _cpu.set_prefilter)):
        if os.environ.get(_variable):
            try:
                _setter(os.environ[_variable])
            except ValueError as error:
                _IMPORT_ERROR = f"${_variable}={os.environ[_variable]!r}: {error}"

# Index dtype the kernels read without conversion.
INDEX_DTYPE = torch.int64


def _as_f32(t: Tensor) -> Tensor:
    """float32, C-contiguous, no autograd history; a copy only if one of those is missing. (The test
    first: three attribute reads cost less than three calls into torch, in a streaming call.)"""
    if t.dtype is torch.float32 and not t.requires_grad and t.is_contiguous():
        return t
    return t.detach().to(torch.float32).contiguous()


def _as_index(t: Tensor) -> Tensor:
    return t.detach().to(INDEX_DTYPE).contiguous()


def _np(t: Tensor | None):
    """A numpy view of a CPU tensor, for a kernel call (None passes through). nanobind takes a numpy array
    in ~1 µs, a torch tensor (through its __dlpack__) in ~5 µs, ~15 µs with the caches cold: with five
    arrays a call, most of the fixed cost of a one-frame streaming search. (Most are detached already:
    a detach is one more call into torch, ~10 µs cold.)"""
    return None if t is None else (t.detach() if t.requires_grad else t).numpy()


# ---- keys of the packed-codebook cache (csrc/cpu/pack_codebook.h) ------------------------------
# The extension keeps the packs of the last few codebooks it searched (at most 4, 256 MiB), keyed
# on ints from here: a token for the storage, the version counter, data pointer, shape, strides.
# The version counter changes with every in-place write through the tensor or its views (the
# module's EMA and dead-code steps included). A storage is pinned (kept alive) while its token is
# live, so no other tensor can take its address and version 0 and be mistaken for it.
# Writes that bypass the version counter (``tensor.data.copy_``, a numpy view) are not seen:
# call fastvq.empty_cache() after them.
PIN_LIMIT, PIN_BYTES = 4, 256 << 20
_pins: OrderedDict = OrderedDict()  # descriptor -> (pinned tensor, token)
_pins_lock = threading.Lock()
_tokens = itertools.count(1)
_DTYPE_CODES = {dtype: code for code, dtype in enumerate((torch.float32, torch.bfloat16, torch.float16, torch.float64))}


def cache_key(codebook: Tensor) -> list[int]:
    """The pack cache's key for this codebook, or [] (no caching: inference tensors have no version)."""
    global _last_key
    last = _last_key
    # The last key again while nothing it was built from has changed: the same tensor object (alive, so its
    # storage is too) in the same _key_state. Half the calls into torch of a full key: ~30 µs of a streaming
    # call with the caches cold.
    if last is not None and last[0]() is codebook and last[1] == _key_state(codebook):
        return last[2]
    key = _full_cache_key(codebook)
    _last_key = (weakref.ref(codebook), _key_state(codebook), key) if key else None
    return key


def _key_state(t: Tensor) -> tuple:
    """A tensor's version, and what a .data assignment can change without moving it: data pointer, dtype,
    shape and strides."""
    return t._version, t.data_ptr(), t.dtype, t.shape, t.stride()


_last_key = None  # (weak reference to the tensor, its _key_state, key) of the last full key


def _full_cache_key(codebook: Tensor) -> list[int]:
    if codebook.is_inference() or not codebook.is_cpu:
        return []
    storage = codebook.untyped_storage()
    descriptor = (codebook.data_ptr(), storage.data_ptr(), storage.nbytes(), codebook.storage_offset(),
                  *codebook.shape, *codebook.stride())
    if storage.nbytes() > PIN_BYTES:
        return []
    with _pins_lock:
        pinned = _pins.get(descriptor)
        if pinned is not None and pinned[0].untyped_storage().data_ptr() == storage.data_ptr():
            _pins.move_to_end(descriptor)
            token = pinned[1]
        else:
            token = next(_tokens)
            _pins[descriptor] = (codebook.detach(), token)
            pinned_bytes = sum(t.untyped_storage().nbytes() for t, _ in _pins.values())
            while len(_pins) > PIN_LIMIT or pinned_bytes > PIN_BYTES:
                old, _ = _pins.popitem(last=False)[1]
                pinned_bytes -= old.untyped_storage().nbytes()
    return [token, codebook._version, *descriptor, _DTYPE_CODES.get(codebook.dtype, -1)]


def release(tensor: Tensor) -> None:
    """Unpin ``tensor``'s storage and drop the int8 rows kept under its key (fastvq.kmeans, when it is done
    with x: a hinted search keys x's rows, and the pin would otherwise keep x alive after it)."""
    if tensor.is_inference() or tensor.device.type != "cpu":
        return
    global _last_key
    key = cache_key(tensor)  # the key the kept rows carry, while the pin still holds it
    storage = tensor.untyped_storage().data_ptr()
    with _pins_lock:
        _last_key = None
        for descriptor in [d for d, (t, _) in _pins.items() if t.untyped_storage().data_ptr() == storage]:
            del _pins[descriptor]
    if _cpu is not None and _IMPORT_ERROR is None and key:
        _cpu.release_rows(key)


def empty_cache() -> None:
    """Release the packed codebooks the cpu kernels keep, and the pins of their storages."""
    global _last_key
    with _pins_lock:
        _pins.clear()
        _last_key = None
    if _cpu is not None and _IMPORT_ERROR is None:
        _cpu.empty_cache()


class CpuBackend(Backend):
    name = "cpu"

    def unavailable_reason(self) -> str | None:
        return _IMPORT_ERROR

    def empty_cache(self) -> None:
        empty_cache()

    def release(self, tensor: Tensor) -> None:
        release(tensor)

    def describe(self) -> str:
        if _IMPORT_ERROR is not None:
            return ""
        capped = f", capped by ${SIMD_ENV_VAR}" if os.environ.get(SIMD_ENV_VAR) else ""
        # the prefilter's reason at a shape it takes in "auto", so only the machine and the switches show
        why_not = _cpu.prefilter_reason(1, 1 << 16, 64)
        kernel = _cpu.prefilter_kernel()
        # the VNNI scan's "auto" thresholds follow the measured int8 : fp32 product rate (csrc/cpu/int8_speed.h)
        speed = f", int8 products {_cpu.int8_product_ratio():.1f}x fp32's" if kernel in ("vnni", "amx") else ""
        prefilter = f"{_cpu.prefilter_mode()} ({kernel} scan{speed})" if not why_not else "unused: " + why_not
        return (f"simd {_cpu.simd_level()} (best here: {_cpu.best_simd_level()}{capped}), "
                f"OpenMP {'on' if _cpu.openmp_enabled() else 'off'}, int8 prefilter {prefilter}")

    def not_supported_reasons(self, *tensors: Tensor) -> list[str]:
        reasons = []
        if _IMPORT_ERROR is not None:
            reasons.append(_IMPORT_ERROR)
        for t in tensors:
            if t is None:
                continue
            if not t.is_cpu:  # is_cpu: no device object to build (a streaming call checks two tensors)
                reasons.append(f"device {t.device}: the cpu backend needs CPU tensors")
            # the dtype first: is_floating_point() is a call into torch, ~5 µs of a streaming call cold
            if t.dtype not in KERNEL_DTYPE_NAMES and t.is_floating_point():
                if t.dtype == torch.float64:
                    reasons.append(
                        "dtype torch.float64: the cpu kernels compute in float32; float64 goes to the torch backend"
                    )
                else:
                    reasons.append(f"dtype {t.dtype}: the cpu kernels take float32, bfloat16 or float16")
        return list(dict.fromkeys(reasons)) if reasons else reasons  # one line per distinct reason, in order

    def nearest_code(self, x: Tensor, codebook: Tensor, want_quantized: bool,
                     hint: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        xf, cf = _as_f32(x), _as_f32(codebook)
        n, d = xf.shape
        indices = torch.empty(n, dtype=INDEX_DTYPE)
        sqdist = torch.empty(n, dtype=torch.float32)
        quantized = torch.empty(n, d, dtype=torch.float32) if want_quantized else None
        # A hinted search is a repeated one (k-means): x's key lets the int8 prefilter keep its rows for the next.
        _cpu.nearest_code(_np(xf), _np(cf), _np(indices), _np(sqdist), _np(quantized), torch.get_num_threads(),
                          cache_key=cache_key(codebook), hint=None if hint is None else _np(hint.contiguous()),
                          rows_key=[] if hint is None else cache_key(x))
        if quantized is not None and quantized.dtype != x.dtype:
            quantized = quantized.to(x.dtype)
        return indices, sqdist, quantized

    def op_not_supported_reasons(self, op: str) -> list[str]:
        if _IMPORT_ERROR is None and not hasattr(_cpu, op):
            return [f"{op}: fastvq._cpu has no kernel for it (rebuild with `pip install -e .`)"]
        return []

    def nearest_codes(self, x: Tensor, codebook: Tensor, k: int) -> tuple[Tensor, Tensor]:
        xf, cf = _as_f32(x), _as_f32(codebook)
        indices = torch.empty(xf.shape[0], k, dtype=INDEX_DTYPE)
        sqdist = torch.empty(xf.shape[0], k, dtype=torch.float32)
        _cpu.nearest_codes(_np(xf), _np(cf), _np(indices), _np(sqdist), torch.get_num_threads(),
                           cache_key=cache_key(codebook))
        return indices, sqdist

    def sample_code(self, x: Tensor, codebook: Tensor, temperature: float, seed: int, cosine: bool) -> Tensor:
        xf, cf = _as_f32(x), _as_f32(codebook)
        indices = torch.empty(xf.shape[0], dtype=INDEX_DTYPE)
        _cpu.sample_code(_np(xf), _np(cf), _np(indices), temperature, seed, cosine, torch.get_num_threads())
        return indices

    def ema_stats(self, x: Tensor, indices: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
        xf = _as_f32(x)
        counts = torch.empty(num_codes, dtype=torch.float32)
        sums = torch.empty(num_codes, xf.shape[1], dtype=torch.float32)
        _cpu.ema_stats(_np(xf), _np(_as_index(indices)), _np(counts), _np(sums), torch.get_num_threads())
        return counts, sums

    def residual_level_backward_(self, grad_x, residual, grad_quantized, codebook, indices, commit_scale,
                                 rotation_trick, accumulate, advance):
        tensors = (grad_x, residual, grad_quantized, codebook)
        if any(t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
            return None  # the kernel works in place on float32 rows
        tiny = torch.zeros(residual.shape[0], dtype=torch.uint8) if advance else None
        _cpu.residual_level_backward(_np(grad_quantized), _np(residual), _np(codebook), _np(_as_index(indices)),
                                     float(commit_scale), rotation_trick, accumulate, _np(grad_x), _np(tiny),
                                     torch.get_num_threads())
        return tiny if tiny is not None else residual.new_zeros((0,), dtype=torch.uint8)

    def quantize_backward(
        self,
        grad_quantized: Tensor | None,
        x: Tensor,
        codebook: Tensor,
        indices: Tensor,
        commit_scale: Tensor,
        codebook_scale: Tensor,
        need_grad_x: bool,
        need_grad_codebook: bool,
        rotation_trick: bool = False,
    ) -> tuple[Tensor | None, Tensor | None]:
        if not (need_grad_x or need_grad_codebook):
            return None, None
        xf, cf = _as_f32(x), _as_f32(codebook)
        gq = None if grad_quantized is None else _as_f32(grad_quantized)
        grad_x = torch.empty_like(xf) if need_grad_x else None
        grad_codebook = torch.empty_like(cf) if need_grad_codebook else None
        _cpu.quantize_backward(
            _np(gq), _np(xf), _np(cf), _np(_as_index(indices)), float(commit_scale), float(codebook_scale),
            _np(grad_x), _np(grad_codebook), torch.get_num_threads(), rotation_trick=rotation_trick,
        )
        if grad_x is not None and grad_x.dtype != x.dtype:
            grad_x = grad_x.to(x.dtype)
        if grad_codebook is not None and grad_codebook.dtype != codebook.dtype:
            grad_codebook = grad_codebook.to(codebook.dtype)
        return grad_x, grad_codebook
