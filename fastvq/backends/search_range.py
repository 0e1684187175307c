"""The GPU backends' check of the centred search's range (issue 12, finding 6), shared by the
triton and cuda backends.

Their kernels search x − c against e − c (c = fastvq.numerics.search_centre) and, on the device,
record the first finite codebook row and the first finite x row whose centred squared norm is
beyond numerics.MAX_CENTRED_SQUARED_NORM (a float32 search could overflow there). Reading those
two numbers back is the one host synchronisation of a GPU search: a silently different index is
not an option, and a ValueError can only be raised from the host.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics import first_out_of_range_code, search_centre, search_range_error


def raise_if_out_of_range(range_check: Tensor, x: Tensor, codebook: Tensor) -> None:
    """range_check: int64 (2,) = (first out-of-range finite code or K, first out-of-range finite row or N).
    Raises the ValueError fastvq.numerics.search_range_error names; the codebook is reported first."""
    first_code, first_row = range_check.tolist()
    if first_code >= codebook.shape[0] and first_row >= x.shape[0]:
        return
    centre = search_centre(codebook).to(torch.float64)
    for what, rows, first in (("codebook", codebook, first_code), ("x", x, first_row)):
        if first < rows.shape[0]:
            centred = rows[first].detach().to(torch.float64) - centre
            raise search_range_error(what, first, float(centred.square().sum()))


def range_check(x: Tensor, codebook: Tensor) -> Tensor:
    """What the GPU kernels record, computed with torch ops (the torch backend's float32 searches):
    int64 (2,) = (first out-of-range finite code or K, first out-of-range finite row or N)."""
    centre = search_centre(codebook).to(torch.float64)

    def first_beyond(rows: Tensor) -> Tensor:
        return first_out_of_range_code(rows, (rows.detach().to(torch.float64) - centre).square().sum(dim=1))

    return torch.stack([first_beyond(codebook), first_beyond(x)])
