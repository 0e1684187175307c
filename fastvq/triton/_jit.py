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
interpreter gets a single config. Every launch goes through ``launch``: the device guard,
the fixed config of deterministic mode, and the capture hook of compile_check.
"""
from __future__ import annotations

import os
from typing import Callable

import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from ..numerics import deterministic  # noqa: F401  (re-exported: fastvq.triton.deterministic)

_TF32_ENV = "FASTVQ_TRITON_TF32"
_PRECISION_ENV = "FASTVQ_TRITON_FP32_PRECISION"
_SEARCH_KERNEL_ENV = "FASTVQ_TRITON_SEARCH_KERNEL"
SEARCH_KERNELS = ("triton", "gluon")
_TRUE = ("1", "true", "yes", "on")
FP32_PRECISIONS = ("tf32x3", "tf32", "ieee")

_options = {"fp32_precision": None, "search_kernel": None}


def interpreting() -> bool:
    """True when Triton launches run in its interpreter (``TRITON_INTERPRET=1``), read now."""
    return bool(triton.knobs.runtime.interpret)


def set_fp32_precision(precision: str | None) -> None:
    """How the searches' ``tl.dot`` treats float32 operands (float32 inputs, and mixed inputs such as
    bf16 x against a float32 codebook): its ``input_precision``.

    ``"tf32x3"`` (default): Triton's 3xTF32 split on tensor cores (sm_80+; FMA before), within a few
    dozen float32 roundings of x·e (reference.nearest_code_slack states the bound it is judged by).
    ``"tf32"``: one TF32 product, ~1e-3 relative error in x·e; a distance can pick a code up to
    ~1e-3·(‖x‖² + ‖e‖²) farther than the nearest. ``"ieee"``: full float32 on FMA units (slower).
    ``None`` returns to the environment: FASTVQ_TRITON_FP32_PRECISION, else "tf32" when
    FASTVQ_TRITON_TF32 is set true, else "tf32x3". This is deliberately not torch's
    ``set_float32_matmul_precision``, which many training scripts lower for the model's matmuls
    without meaning the argmin.
    """
    if precision is not None and precision not in FP32_PRECISIONS:
        raise ValueError(f"precision must be one of {FP32_PRECISIONS} or None, got {_short_repr(precision)}")
    _options["fp32_precision"] = precision


def _option(name: str, variable: str, choices: tuple[str, ...], default: str) -> str:
    """An option's value: set by its call, else the environment variable's (validated), else the default."""
    if _options[name] is not None:
        return _options[name]
    value = os.environ.get(variable, "").strip().lower()
    if value and value not in choices:
        raise ValueError(f"{variable} must be one of {choices}, got {_short_repr(value)}")
    return value or default


def fp32_precision() -> str:
    """The ``input_precision`` float32 operands get now (set_fp32_precision)."""
    tf32 = os.environ.get(_TF32_ENV, "").strip().lower() in _TRUE
    return _option("fp32_precision", _PRECISION_ENV, FP32_PRECISIONS, "tf32" if tf32 else "tf32x3")


def set_allow_tf32(allow: bool | None) -> None:
    """``set_fp32_precision("tf32")`` when True; False asks for float32-grade accuracy, the default
    "tf32x3"; ``None`` returns to the environment (set_fp32_precision(None))."""
    if allow is not None and not isinstance(allow, bool):
        raise TypeError(f"allow must be a bool or None, got {type(allow).__name__}")
    set_fp32_precision(None if allow is None else "tf32" if allow else "tf32x3")


def allow_tf32() -> bool:
    """True when float32 operands take single TF32 products (fp32_precision() == "tf32")."""
    return fp32_precision() == "tf32"


def set_search_kernel(name: str | None) -> None:
    """Which kernel runs nearest_code's bf16 search on Hopper: ``"triton"`` (default), or ``"gluon"``, the
    hand-scheduled one whose next tile's wgmma overlaps the current tile's argmin (nearest_code_gluon.py;
    bf16 x and codebook, d <= 64, compute capability 9.x; other inputs keep the Triton kernel, and
    ``gluon_search_reason(x, codebook)`` says why). ``None`` returns to FASTVQ_TRITON_SEARCH_KERNEL, else
    "triton". "gluon" is opt-in until a GPU run of the device check has measured it (README)."""
    if name is not None and name not in SEARCH_KERNELS:
        raise ValueError(f"name must be one of {SEARCH_KERNELS} or None, got {_short_repr(name)}")
    _options["search_kernel"] = name


def search_kernel() -> str:
    """The search kernel asked for now (set_search_kernel)."""
    return _option("search_kernel", _SEARCH_KERNEL_ENV, SEARCH_KERNELS, "triton")


def search_precision(x_dtype, codebook_dtype) -> str:
    """The ``input_precision`` of the searches' ``tl.dot`` for these input dtypes: bf16/fp16 inputs of
    one dtype multiply in that dtype on tensor cores ("tf32", the argument Triton ignores for them);
    everything else is searched on float32 operands, at fp32_precision(). (Under the interpreter tl.dot
    is a float32 numpy matmul whatever the argument.)"""
    import torch

    if x_dtype == codebook_dtype and x_dtype in (torch.bfloat16, torch.float16):
        return "tf32"
    return fp32_precision()


def _short_repr(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# BLOCK_D, the slice of d per tl.dot, is not tuned: it follows d up to a cap (tl.dot needs >= 16).
MAX_BLOCK_D = 128
# nearest_code keeps a 16-bit x tile resident up to d = 256 (issue 14, item 5): d-slices would drain the
# pipeline on every code tile. _score_tile.prune_search_configs keeps the configs that hold it without spilling.
MAX_RESIDENT_D = 256
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


def _bench_without_flush(kernel_call, quantiles):
    """The autotuner's timer: ``triton.testing.do_bench`` without its L2 flush, whose 256 MB buffer
    would stay in torch's caching allocator after the first tuning (issue 14, finding 8). Back-to-back
    launches timed with CUDA events; the quantiles of 20 timed runs after one warm-up, in ms."""
    import torch

    kernel_call()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(20)]
    for start, stop in events:
        start.record()
        kernel_call()
        stop.record()
    torch.cuda.synchronize()
    times = torch.tensor([start.elapsed_time(stop) for start, stop in events])
    return [float(torch.quantile(times, q)) for q in quantiles]


class _KernelSpec:
    def __init__(self, fn: Callable, configs: list | None, interpreter_config, key: list[str], fixed_config,
                 do_not_specialize: list[str], prune=None, restore_value: list[str] | None = None):
        self.fn = fn
        self.prune = prune
        self.restore_value = restore_value
        self.configs = configs
        self.interpreter_config = interpreter_config
        self.key = key
        self.fixed_config = fixed_config
        self.do_not_specialize = do_not_specialize
        self.built: dict[tuple[bool, bool], object] = {}

    def build(self, interpret: bool, tuned: bool = True):
        """The kernel for a mode: autotuned over ``configs`` when it has them and ``tuned``, else plain."""
        tuned = tuned and self.configs is not None
        if (interpret, tuned) not in self.built:
            if interpret:
                base = InterpretedFunction(self.fn)
            else:
                base = JITFunction(self.fn, do_not_specialize=self.do_not_specialize)
            kernel = base
            if tuned:
                configs = [self.interpreter_config] if interpret else self.configs
                pruning = {"early_config_prune": self.prune} if self.prune and not interpret else None
                kernel = triton.autotune(configs=configs, key=self.key, do_bench=_bench_without_flush,
                                         prune_configs_by=pruning, restore_value=self.restore_value)(base)
            kernel._fastvq_spec = self
            self.built[(interpret, tuned)] = kernel
        return self.built[(interpret, tuned)]


def kernel(configs: list | None = None, interpreter_config=None, key: list[str] | None = None, fixed_config=None,
           do_not_specialize: list[str] | None = None, prune=None, restore_value: list[str] | None = None):
    """Like ``@triton.autotune(configs, key, prune_configs_by={"early_config_prune": prune}, restore_value)``
    over ``@triton.jit`` (or plain ``@triton.jit`` when ``configs`` is None). ``launch`` runs it with
    ``fixed_config(launch kwargs)`` instead of tuning in deterministic mode, and with
    ``interpreter_config`` under the interpreter."""

    def decorate(fn: Callable):
        spec = _KernelSpec(fn, configs, interpreter_config, key or [], fixed_config, do_not_specialize or [], prune,
                           restore_value)
        return spec.build(interpreting())

    return decorate


def for_current_mode(decorated, tuned: bool = True):
    """The same kernel, decorated for the mode in force now (with the device functions it calls)."""
    interpret = interpreting()
    for function in _device_functions:
        function.bind(interpret)
    return decorated._fastvq_spec.build(interpret, tuned)


def config_kwargs(config) -> dict:
    """A triton.Config as launch keyword arguments."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


class Captured(Exception):
    """Raised by ``launch`` inside ``capture_launches``, after recording the launch it stopped."""

    def __init__(self, kernel, grid, args, kwargs):
        super().__init__("kernel launch captured")
        self.kernel, self.grid, self.args, self.kwargs = kernel, grid, args, kwargs


_capturing = {"on": False}


class capture_launches:
    """Within this context ``launch`` runs nothing: it raises Captured with the kernel it would run
    (compiled mode, the autotuned kernel unless deterministic) and its exact arguments, so that
    fastvq.triton.compile_check compiles what a real launch would, specialisation included."""

    def __enter__(self):
        _capturing["on"] = True
        return self

    def __exit__(self, *exc):
        _capturing["on"] = False
        return False


def launch(decorated, grid, *args, **kwargs):
    """Launch one of fastvq's kernels on the device of its first tensor argument, on that device's
    current stream (Triton launches on the current device's current stream otherwise: a tensor on
    cuda:1 would be read from cuda:0's context). An autotuned kernel runs its ``fixed_config`` in
    deterministic mode (numerics.deterministic()), so results do not hang on the autotuner's pick."""
    from torch.library import wrap_triton

    from ..numerics import deterministic

    spec = decorated._fastvq_spec
    interpret = interpreting() and not _capturing["on"]
    tuned = spec.configs is not None and not interpret and not deterministic()
    if spec.configs is not None and not tuned:
        kwargs = {**kwargs, **config_kwargs(spec.interpreter_config if interpret else spec.fixed_config(kwargs))}
    for function in _device_functions:
        function.bind(interpret)
    built = spec.build(interpret, tuned)
    if _capturing["on"]:
        raise Captured(built, grid, args, kwargs)
    with _device_of(args):
        wrap_triton(built)[grid](*args, **kwargs)


def _device_of(args):
    """A context in which the first tensor argument's CUDA device is current (nothing for CPU tensors)."""
    import contextlib

    import torch

    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch_gluon(gluon_kernel, grid, *args, **kwargs):
    """``launch`` for a Gluon kernel: no autotuning and no interpreter (Gluon has none), the same device
    guard and capture hook. Launched directly, not through ``wrap_triton``: torch.compile does not analyse
    Gluon kernels, and the caller (nearest_code's triton_op) runs it only in eager mode (torch.compile
    traces triton_nearest_code with the Triton kernel)."""
    if _capturing["on"]:
        raise Captured(gluon_kernel, grid, args, kwargs)
    with _device_of(args):
        gluon_kernel[grid](*args, **kwargs)
