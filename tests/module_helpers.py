"""Helpers the FastVectorQuantizer test files share: clustered rows, state snapshots, the oracle's settings."""
from __future__ import annotations

import torch


def blobs(num_rows, dim, num_centres=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(num_centres, dim, generator=generator)
    labels = torch.randint(0, num_centres, (num_rows,), generator=generator)
    return centres[labels] + 0.3 * torch.randn(num_rows, dim, generator=generator)


def state_of(module):
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def oracle_state(module):
    """Clones of a one-codebook module's (embed (K, d), cluster_size (K,), embed_avg (K, d)): the oracle's state."""
    state = module._codebook
    return state.embed[0].detach().clone(), state.cluster_size[0].clone(), state.embed_avg[0].clone()


# What fastvq.reference.ema_vq_step computes: a straight-through quantizer with this commitment weight.
ORACLE_SETTINGS = dict(rotation_trick=False, commitment_weight=0.25)
