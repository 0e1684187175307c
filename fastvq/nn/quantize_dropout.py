"""Quantize dropout (SoundStream's structured bitrate dropout) with vector-quantize-pytorch's draws.

In training, a forward quantizes only levels 0..i for a random i and reports the rest as
dropped (indices −1, losses 0). vqp 1.32 draws i as ``random.Random(seed).randrange(cutoff, L)``
with ``seed = torch.randint(0, 10_000, ())`` from torch's global RNG (summed over ranks when
distributed); the same calls here give the same level for the same torch seed.
"""
from __future__ import annotations

import math
import random

import torch
import torch.distributed as dist

from .distributed import is_distributed


def maybe_sync_seed(device: torch.device, max_size: int = 10_000) -> int:
    """vqp's get_maybe_sync_seed: one draw from torch's RNG on ``device``, summed over ranks."""
    seed = torch.randint(0, max_size, (), device=device)
    if is_distributed():
        dist.all_reduce(seed)
    return int(seed.item())


def dropout_level(seed: int, cutoff_index: int, num_quantizers: int, multiple_of: int) -> int:
    """The last level quantized this step: vqp's randrange, then rounded up so that the number of
    levels kept is a multiple of ``multiple_of`` (EnCodec's structured dropout)."""
    if not 0 <= cutoff_index < num_quantizers:
        raise ValueError(f"quantize_dropout_cutoff_index must be in [0, num_quantizers) = [0, {num_quantizers}) "
                         f"for quantize dropout, got {cutoff_index}")
    level = random.Random(seed).randrange(cutoff_index, num_quantizers)
    if multiple_of != 1:
        level = math.ceil((level + 1) / multiple_of) * multiple_of - 1
    return level
