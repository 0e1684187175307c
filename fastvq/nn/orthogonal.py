"""vqp's codebook orthogonal regulariser (``orthogonal_reg_weight``), for FastVectorQuantizer and beam search."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def orthogonal_loss(codebook: Tensor) -> Tensor:
    """Eq. (2) of Shin et al. 2021 as vqp computes it: mean squared cosine similarity − 1/K.
    Builds the K×K similarity of the codebook (not of the data); bound it with orthogonal_reg_max_codes."""
    heads, num_codes = codebook.shape[:2]
    normed = F.normalize(codebook, dim=-1, eps=1e-6)
    cosine = normed @ normed.transpose(-1, -2)
    return (cosine**2).sum() / (heads * num_codes**2) - 1 / num_codes


def codebook_orthogonal_loss(layer, indices: Tensor) -> Tensor:
    """A FastVectorQuantizer's orthogonal loss (unweighted) over the codes vqp draws: those in ``indices`` with
    orthogonal_reg_active_codes_only, then at most orthogonal_reg_max_codes of them by torch.randperm."""
    codebook = layer._codebook.embed
    if layer.orthogonal_reg_active_codes_only:
        codebook = codebook[:, torch.unique(indices)]
    num_codes = codebook.shape[-2]
    if layer.orthogonal_reg_max_codes is not None and num_codes > layer.orthogonal_reg_max_codes:
        codebook = codebook[:, torch.randperm(num_codes, device=codebook.device)[:layer.orthogonal_reg_max_codes]]
    return orthogonal_loss(codebook)
