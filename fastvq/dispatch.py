"""Choose a backend for some tensors, and say why the others were not used.

``backend="auto"`` takes the first backend in the device's preference list whose
``not_supported_reasons`` is empty. A named backend that cannot run raises
``BackendNotSupportedError`` listing its reasons. The environment variable
``FASTVQ_BACKEND`` overrides the ``backend`` argument everywhere.
"""
from __future__ import annotations

import importlib
import os

from torch import Tensor

from .backends.base import Backend

ENV_VAR = "FASTVQ_BACKEND"

# name -> (module, class). Modules are imported on first use; a module that fails to
# import becomes a backend that reports the failure instead of disappearing.
_BACKEND_CLASSES = {
    "cpu": ("fastvq.backends.cpu", "CpuBackend"),
    "triton": ("fastvq.backends.triton", "TritonBackend"),
    "cuda": ("fastvq.backends.cuda", "CudaBackend"),
    "torch": ("fastvq.backends.torch", "TorchBackend"),
}
BACKEND_NAMES = tuple(_BACKEND_CLASSES)

# Preference per device type under "auto". Triton serves CPU tensors only through
# its interpreter, which is far too slow to pick silently, so it is never auto on CPU.
AUTO_ORDER = {
    "cpu": ("cpu", "torch"),
    "cuda": ("triton", "cuda", "torch"),
}

_instances: dict[str, Backend] = {}


class BackendNotSupportedError(ValueError):
    """A backend was named explicitly but cannot run on the given inputs."""


class _BrokenBackend(Backend):
    """Stands in for a backend whose module could not be imported."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self._reason = reason

    def unavailable_reason(self) -> str | None:
        return self._reason

    def not_supported_reasons(self, *tensors: Tensor) -> list[str]:
        return [self._reason]


def get_backend(name: str) -> Backend:
    if name not in _BACKEND_CLASSES:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(map(repr, BACKEND_NAMES))}, got {name!r}")
    if name not in _instances:
        module_name, class_name = _BACKEND_CLASSES[name]
        try:
            backend = getattr(importlib.import_module(module_name), class_name)()
        except Exception as error:  # recorded and surfaced by fastvq.info and forced-backend errors
            backend = _BrokenBackend(name, f"{module_name} failed to import: {type(error).__name__}: {error}")
        _instances[name] = backend
    return _instances[name]


def _check_known(name: str, source: str) -> None:
    if name != "auto" and name not in _BACKEND_CLASSES:
        raise ValueError(f"{source} must be 'auto' or one of {', '.join(map(repr, BACKEND_NAMES))}, got {name!r}")


def check_backend_argument(backend) -> str:
    """A ``backend=`` argument as given (before $FASTVQ_BACKEND), checked."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    _check_known(backend, "backend")
    return backend


def check_backend_name(backend) -> str:
    """The backend name that will be used ($FASTVQ_BACKEND, else the argument), checked."""
    check_backend_argument(backend)
    override = os.environ.get(ENV_VAR, "").strip()
    if override:
        _check_known(override, f"${ENV_VAR}")
        return override
    return backend


def auto_order(*tensors: Tensor) -> tuple[str, ...]:
    device_type = tensors[0].device.type if tensors else "cpu"
    return AUTO_ORDER.get(device_type, ("torch",))


def resolve(backend: str, *tensors: Tensor) -> Backend:
    """The backend that will run on ``tensors``, or an error naming why it cannot."""
    name = check_backend_name(backend)
    if name == "auto":
        for candidate in auto_order(*tensors):
            chosen = get_backend(candidate)
            if not chosen.not_supported_reasons(*tensors):
                return chosen
        return get_backend("torch")
    chosen = get_backend(name)
    reasons = chosen.not_supported_reasons(*tensors)
    if reasons:
        source = f" (from ${ENV_VAR})" if os.environ.get(ENV_VAR, "").strip() else ""
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


def explain(*tensors: Tensor) -> dict[str, list[str]]:
    """For each backend, why it cannot run on ``tensors`` (empty list: it can)."""
    return {name: get_backend(name).not_supported_reasons(*tensors) for name in BACKEND_NAMES}
