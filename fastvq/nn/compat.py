"""vector-quantize-pytorch arguments: the checks of FastVectorQuantizer's constructor, and the
features fastvq does not implement.

A model that swaps ``VectorQuantize`` for ``FastVectorQuantizer`` (or ``ResidualVQ``) must either
train the same or fail loudly. So each argument below is accepted at its vector-quantize-pytorch
default, where it changes nothing, and any other value raises a ValueError naming it. Values are
echoed with a short repr, never a whole tensor.
"""
from __future__ import annotations

import math

from ..checks import short_repr

# VectorQuantize.__init__ arguments (vqp 1.32) that fastvq does not implement, with the default
# at which they change nothing.
VECTOR_QUANTIZE_UNSUPPORTED = {
    "directional_reparam": False,
    "sync_affine_param": False,
    "vq_bridge": None,
    "in_place_codebook_optimizer": None,
    "affine_param": False,
    "sync_update_v": 0.0,
}

# VectorQuantize.forward arguments fastvq does not implement: none (the table stays for the checks).
FORWARD_UNSUPPORTED: dict = {}

# ResidualVQ.__init__ kwargs fastvq does not implement (the rest go to each FastVectorQuantizer).
RESIDUAL_VQ_UNSUPPORTED = {
    "diveq": False,
    "implicit_neural_codebook": False,
    "mlp_kwargs": {},
}


def _is_default(value, default) -> bool:
    if default is None:
        return value is None
    if hasattr(value, "shape"):  # a tensor is never a default here
        return False
    try:
        return bool(value == default)
    except Exception:  # noqa: BLE001  (a value that cannot be compared is not the default)
        return False


def reject_unsupported(owner: str, kwargs: dict, unsupported: dict) -> None:
    """Raise for unknown names (TypeError) and for non-default unsupported values (ValueError)."""
    for name, value in kwargs.items():
        if name not in unsupported:
            raise TypeError(f"{owner} got an unexpected keyword argument {name!r}")
        default = unsupported[name]
        if not _is_default(value, default):
            raise ValueError(f"{owner} does not implement vector-quantize-pytorch's {name}={short_repr(value)}; "
                             f"only the default {name}={default!r} is accepted")


def reject_unsupported_forward(owner: str, **kwargs) -> None:
    reject_unsupported(f"{owner}.forward", kwargs, FORWARD_UNSUPPORTED)


def check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {short_repr(value)}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")


def _check_real(name: str, value, low: float, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {short_repr(value)}")
    if not (low <= value <= high and math.isfinite(value)):
        expected = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be a finite number {expected}, got {value}")


def check_vector_quantize_arguments(owner: str, arguments: dict) -> None:
    """FastVectorQuantizer's constructor arguments, each checked with a message naming it."""
    reject_unsupported(owner, {name: arguments[name] for name in VECTOR_QUANTIZE_UNSUPPORTED},
                       VECTOR_QUANTIZE_UNSUPPORTED)
    for name in ("dim", "codebook_size", "heads"):
        check_int(name, arguments[name], 1)
    check_int("kmeans_iters", arguments["kmeans_iters"], 1 if arguments["kmeans_init"] else 0)
    if arguments["codebook_dim"] is not None:
        check_int("codebook_dim", arguments["codebook_dim"], 1)
    if arguments["orthogonal_reg_max_codes"] is not None:
        check_int("orthogonal_reg_max_codes", arguments["orthogonal_reg_max_codes"], 1)
    _check_real("decay", arguments["decay"], 0.0, 1.0)
    for name in ("eps", "commitment_weight", "threshold_ema_dead_code", "orthogonal_reg_weight",
                 "codebook_diversity_loss_weight", "codebook_diversity_temperature", "sample_codebook_temp"):
        _check_real(name, arguments[name], 0.0)
    if arguments["rotation_trick"] not in (None, True, False):
        raise TypeError(f"rotation_trick must be None, True or False, got {short_repr(arguments['rotation_trick'])}")
    learnable = bool(arguments["learnable_codebook"])
    if learnable and (arguments["ema_update"] is None or arguments["ema_update"]):
        raise ValueError("learnable_codebook=True needs ema_update=False: the codebook learns either by EMA "
                         "or by gradient (vector-quantize-pytorch asserts the same)")
    if learnable and arguments["use_cosine_sim"]:
        raise ValueError("use_cosine_sim=True is not compatible with learnable_codebook=True "
                         "(vector-quantize-pytorch asserts the same)")
    if (arguments["orthogonal_reg_active_codes_only"] and arguments["heads"] > 1
            and arguments["separate_codebook_per_head"]):
        raise ValueError("orthogonal_reg_active_codes_only is not compatible with separate_codebook_per_head "
                         "and heads > 1 (vector-quantize-pytorch asserts the same)")
