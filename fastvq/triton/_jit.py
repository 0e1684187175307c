"""Decorating fastvq's Triton kernels for the current execution mode, and the two user options.

Triton decides at *decoration* time whether ``@triton.jit`` builds a compiled
``JITFunction`` or an ``InterpretedFunction`` (it reads ``TRITON_INTERPRET`` then,
not at launch). So a kernel decorated at import while ``TRITON_INTERPRET`` was unset
can never run on CPU tensors, and one decorated under the interpreter never compiles.
``kernel(...)`` therefore decorates once at import, for the mode in force then (so
``torch.library`` and the AOT-autograd cache see a real kernel object), and
``for_current_mode`` re-decorates it, once per mode, when the mode at launch differs.
Tests can thus set ``TRITON_INTERPRET=1`` in a fixture without it leaking elsewhere.

Under the interpreter autotuning would run every config through Python, so the
interpreter gets a single config.
"""
from __future__ import annotations

import os
from typing import Callable

import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from ..numerics import deterministic  # noqa: F401  (re-exported: fastvq.triton.deterministic)

_TF32_ENV = "FASTVQ_TRITON_TF32"
_TRUE = ("1", "true", "yes", "on")

_options = {"allow_tf32": None}


def interpreting() -> bool:
    """True when Triton launches run in its interpreter (``TRITON_INTERPRET=1``), read now."""
    return bool(triton.knobs.runtime.interpret)


def set_allow_tf32(allow: bool | None) -> None:
    """Let float32 searches use TF32 tensor cores (faster, ~1e-3 relative error in x·e).

    Off by default: a TF32 distance can pick a code up to ~1e-3·(‖x‖² + ‖e‖²) farther
    than the nearest. ``None`` returns to the environment variable FASTVQ_TRITON_TF32.
    This is deliberately not torch's ``set_float32_matmul_precision``, which many
    training scripts lower for the model's matmuls without meaning the argmin.
    """
    if allow is not None and not isinstance(allow, bool):
        raise TypeError(f"allow must be a bool or None, got {type(allow).__name__}")
    _options["allow_tf32"] = allow


def allow_tf32() -> bool:
    if _options["allow_tf32"] is not None:
        return _options["allow_tf32"]
    return os.environ.get(_TF32_ENV, "").strip().lower() in _TRUE


# BLOCK_D, the slice of d per tl.dot, is not tuned: it follows d up to a cap (tl.dot needs >= 16).
MAX_BLOCK_D = 128
# Under the interpreter, a smaller cap makes d = 33 and d = 64 take the chunked-d path too.
INTERPRETER_MAX_BLOCK_D = 32


def block_d_for(dim: int, cap: int = MAX_BLOCK_D) -> int:
    """The d-slice of every fastvq Triton kernel: next power of two of d, in [16, cap]
    (cap is INTERPRETER_MAX_BLOCK_D under the interpreter)."""
    if interpreting():
        cap = min(cap, INTERPRETER_MAX_BLOCK_D)
    return min(max(16, triton.next_power_of_2(dim)), cap)


class _DeviceFunction:
    """A @triton.jit function that kernels call (not launched itself), decorated per mode like the kernels."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.built: dict[bool, object] = {}

    def bind(self, interpret: bool):
        """Decorate for this mode and make the module global that kernels resolve point at it."""
        if interpret not in self.built:
            self.built[interpret] = InterpretedFunction(self.fn) if interpret else JITFunction(self.fn)
        self.fn.__globals__[self.fn.__name__] = self.built[interpret]
        return self.built[interpret]


_device_functions: list[_DeviceFunction] = []


def device_function(fn: Callable):
    """Like ``@triton.jit`` for a function that fastvq's kernels call. Triton resolves such a call
    through the module's globals when it compiles (or interprets) the kernel, so the global must
    be decorated for the mode the kernel runs in: ``for_current_mode`` rebinds every one."""
    spec = _DeviceFunction(fn)
    _device_functions.append(spec)
    return spec.bind(interpreting())


class _KernelSpec:
    def __init__(self, fn: Callable, configs: list | None, interpreter_config, key: list[str]):
        self.fn = fn
        self.configs = configs
        self.interpreter_config = interpreter_config
        self.key = key
        self.built: dict[bool, object] = {}

    def build(self, interpret: bool):
        if interpret not in self.built:
            base = InterpretedFunction(self.fn) if interpret else JITFunction(self.fn)
            if self.configs is None:
                kernel = base
            else:
                configs = [self.interpreter_config] if interpret else self.configs
                kernel = triton.autotune(configs=configs, key=self.key)(base)
            kernel._fastvq_spec = self
            self.built[interpret] = kernel
        return self.built[interpret]


def kernel(configs: list | None = None, interpreter_config=None, key: list[str] | None = None):
    """Like ``@triton.autotune(configs, key)`` over ``@triton.jit`` (or plain ``@triton.jit``
    when ``configs`` is None), with one config under the interpreter."""

    def decorate(fn: Callable):
        spec = _KernelSpec(fn, configs, interpreter_config, key or [])
        return spec.build(interpreting())

    return decorate


def for_current_mode(decorated):
    """The same kernel, decorated for the mode in force now (with the device functions it calls)."""
    interpret = interpreting()
    for function in _device_functions:
        function.bind(interpret)
    return decorated._fastvq_spec.build(interpret)
