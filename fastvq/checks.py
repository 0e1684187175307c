"""Argument checks that say what was expected. Raise TypeError/ValueError, never assert."""
from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def shape_str(shape) -> str:
    dims = tuple(shape)
    return "(" + ", ".join(str(s) for s in dims) + ("," if len(dims) == 1 else "") + ")"


def short_repr(value, limit: int = 80) -> str:
    """A value for an error message: a tensor by its shape, dtype and device, anything else by a
    repr cut to ``limit`` characters (never a whole tensor or a long list)."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {shape_str(value.shape)}, dtype {value.dtype}, on {value.device}"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_float_tensor(name: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, float64, bfloat16 or float16), "
            f"got dtype {value.dtype}"
        )


def check_codebook(codebook) -> None:
    check_float_tensor("codebook", codebook)
    if codebook.dim() != 2:
        raise ValueError(f"codebook must have shape (K, d), got {shape_str(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError(f"codebook must have at least one row (K >= 1), got shape {shape_str(codebook.shape)}")
    if codebook.shape[1] == 0:
        raise ValueError(f"codebook must have at least one column (d >= 1), got shape {shape_str(codebook.shape)}")


def check_columns(name: str, value: Tensor) -> None:
    """At least one column: d = 0 is the same error in every dtype, not only where a kernel refuses it."""
    if value.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one column (d >= 1), got shape {shape_str(value.shape)}")


def check_same_device(x: Tensor, codebook: Tensor) -> None:
    # is_cpu first: no device objects to build and compare (~5 µs of a streaming call with the caches cold)
    if not (x.is_cpu and codebook.is_cpu) and x.device != codebook.device:
        raise ValueError(f"x and codebook must be on the same device, got x on {x.device} and codebook on {codebook.device}")


def check_rows_and_codebook(x, codebook) -> None:
    """x (N, d) and codebook (K, d) for ``nearest_code``."""
    check_float_tensor("x", x)
    check_codebook(codebook)
    if x.dim() != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"x must have shape (N, d) with d == codebook.shape[1] == {codebook.shape[1]}, "
            f"got {shape_str(x.shape)}"
        )
    check_same_device(x, codebook)


def check_vectors_and_codebook(x, codebook) -> None:
    """x (..., d) and codebook (K, d) for ``quantize``."""
    check_float_tensor("x", x)
    check_codebook(codebook)
    if x.dim() < 1 or x.shape[-1] != codebook.shape[1]:
        raise ValueError(
            f"x must have shape (..., d) with d == codebook.shape[1] == {codebook.shape[1]}, "
            f"got {shape_str(x.shape)}"
        )
    check_same_device(x, codebook)


def check_indices(indices, num_rows: int, num_codes: int) -> None:
    if not isinstance(indices, Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must have dtype torch.int64, got {indices.dtype}")
    if indices.shape != (num_rows,):
        raise ValueError(f"indices must have shape ({num_rows},) to match x, got {shape_str(indices.shape)}")
    check_positive_int("num_codes", num_codes)


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")


def check_fraction(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def check_non_negative(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}")
