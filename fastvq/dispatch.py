"""Choose a backend for some tensors, and say why the others were not used.

``backend="auto"`` takes the first backend in the device's preference list whose
``not_supported_reasons`` is empty. A named backend that cannot run raises
``BackendNotSupportedError`` listing its reasons. The environment variable
``FASTVQ_BACKEND`` overrides the ``backend`` argument everywhere.
"""
from __future__ import annotations

import os

from torch import Tensor

from .backends.base import Backend
from .backends.cpu import CpuBackend
from .backends.cuda import CudaBackend
from .backends.torch import TorchBackend
from .backends.triton import TritonBackend

ENV_VAR = "FASTVQ_BACKEND"

# Each backend module guards its own optional import (fastvq._cpu, fastvq._cuda, triton)
# and reports a failure through unavailable_reason(), so these imports never fail.
BACKENDS: dict[str, Backend] = {
    "cpu": CpuBackend(),
    "triton": TritonBackend(),
    "cuda": CudaBackend(),
    "torch": TorchBackend(),
}
BACKEND_NAMES = tuple(BACKENDS)

# Ops that not every backend implements (resolve(..., op=name) checks Backend.op_not_supported_reasons).
PARTIAL_OPS = ("nearest_codes", "sample_code")

# Preference per device type under "auto". Triton serves CPU tensors only through
# its interpreter, which is far too slow to pick silently, so it is never auto on CPU.
AUTO_ORDER = {
    "cpu": ("cpu", "torch"),
    "cuda": ("triton", "cuda", "torch"),
}

class BackendNotSupportedError(ValueError):
    """A backend was named explicitly but cannot run on the given inputs."""


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(map(repr, BACKEND_NAMES))}, got {name!r}")
    return BACKENDS[name]


def _check_known(name: str, source: str) -> None:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{source} must be 'auto' or one of {', '.join(map(repr, BACKEND_NAMES))}, got {name!r}")


def check_backend_argument(backend) -> str:
    """A ``backend=`` argument as given (before $FASTVQ_BACKEND), checked."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    _check_known(backend, "backend")
    return backend


# os.environ's own dict and key, where CPython has them: os.environ.get of a variable that is not set
# raises and catches a KeyError, ~35 µs with the caches cold (a streaming call reads it twice); a miss
# in the dict it keeps in step costs a dict lookup.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if _ENVIRON_DATA is not None and hasattr(os.environ, "encodekey") else None


def env_override() -> str:
    """$FASTVQ_BACKEND, stripped; "" when it is not set. Read on every call, so a change applies at once."""
    if _ENV_KEY is not None and _ENV_KEY not in _ENVIRON_DATA:
        return ""
    return os.environ.get(ENV_VAR, "").strip()


def check_backend_name(backend) -> str:
    """The backend name that will be used ($FASTVQ_BACKEND, else the argument), checked."""
    check_backend_argument(backend)
    override = env_override()
    if override:
        _check_known(override, f"${ENV_VAR}")
        return override
    return backend


def auto_order(*tensors: Tensor) -> tuple[str, ...]:
    if not tensors or tensors[0].is_cpu:  # is_cpu: no device object to build
        return AUTO_ORDER["cpu"]
    return AUTO_ORDER.get(tensors[0].device.type, ("torch",))


def _reasons(chosen: Backend, tensors, op: str | None) -> list[str]:
    reasons = chosen.not_supported_reasons(*tensors)
    return (reasons + chosen.op_not_supported_reasons(op)) if op is not None else reasons


def resolve(backend: str, *tensors: Tensor, op: str | None = None) -> Backend:
    """The backend that will run on ``tensors``, or an error naming why it cannot. ``op``: the op's
    name, for ops some backends do not implement (``Backend.op_not_supported_reasons``)."""
    name = check_backend_name(backend)
    if name == "auto":
        for candidate in auto_order(*tensors):
            chosen = get_backend(candidate)
            if not _reasons(chosen, tensors, op):
                return chosen
        return get_backend("torch")
    chosen = get_backend(name)
    reasons = _reasons(chosen, tensors, op)
    if reasons:
        source = f" (from ${ENV_VAR})" if env_override() else ""
        raise BackendNotSupportedError(
            f"backend {name!r}{source} cannot run on these inputs: " + "; ".join(reasons)
        )
    return chosen


def available_backends() -> list[str]:
    """Backends this install can run on some input (built, importable)."""
    return [name for name in BACKEND_NAMES if get_backend(name).unavailable_reason() is None]


def unavailable_reasons() -> dict[str, str]:
    """For each backend this install lacks, the reason."""
    reasons = {}
    for name in BACKEND_NAMES:
        reason = get_backend(name).unavailable_reason()
        if reason is not None:
            reasons[name] = reason
    return reasons


def empty_cache() -> None:
    """Release what the backends keep between calls: the cpu kernels' packed codebooks (at most 4, 256 MiB
    across all threads, reused while a codebook's data pointer, shape, strides and version counter stay the
    same) and the int8 rows a hinted nearest_code keeps for the next (one x, at most 64 MiB). Needed after
    writes that bypass the version counter (``tensor.data.copy_``, numpy views)."""
    for backend in BACKENDS.values():
        backend.empty_cache()


def release(tensor: Tensor) -> None:
    """Let every backend forget what it keeps for ``tensor`` alone (fastvq.kmeans, once done with its rows)."""
    for backend in BACKENDS.values():
        backend.release(tensor)


def explain(*tensors: Tensor, op: str | None = None) -> dict[str, list[str]]:
    """For each backend, why it cannot run on ``tensors`` (or run ``op`` on them); empty list: it can."""
    return {name: _reasons(get_backend(name), tensors, op) for name in BACKEND_NAMES}
