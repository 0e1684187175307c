"""GroupedResidualVQ: vector-quantize-pytorch 1.32's, one ResidualVQ per slice of the features."""
from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from ..checks import check_float_tensor, short_repr
from .compat import check_int
from .quantize_dropout import maybe_sync_seed
from .residual import ResidualVQ


class GroupedResidualVQ(nn.Module):
    """Drop-in for ``vector_quantize_pytorch.GroupedResidualVQ``: ``dim`` is split into ``groups``
    equal slices along ``split_dim`` (the last axis, or axis 1 with ``accept_image_fmap``), each
    quantized by its own ResidualVQ built with the other kwargs.

    forward(x, indices=None, return_all_codes=False, sample_codebook_temp=None,
    freeze_codebook=False, mask=None) returns ``(quantized, indices (groups, ..., L), losses
    (groups, L))``, plus a tuple with each group's codes with ``return_all_codes``, as vqp does.
    In training one torch draw seeds the quantize dropout of every group (vqp draws it whether or
    not quantize dropout is on).
    """

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__()
        check_int("dim", dim, 1)
        check_int("groups", groups, 1)
        if dim % groups:
            raise ValueError(f"dim must be divisible by groups, got dim={dim} and groups={groups}")
        self.dim = dim
        self.groups = groups
        self.accept_image_fmap = bool(accept_image_fmap)
        self.rvqs = nn.ModuleList(ResidualVQ(dim=dim // groups, accept_image_fmap=accept_image_fmap, **kwargs)
                                  for _ in range(groups))

    @property
    def codebooks(self) -> Tensor:
        return torch.stack(tuple(rvq.codebooks for rvq in self.rvqs))

    @property
    def split_dim(self) -> int:
        return 1 if self.accept_image_fmap else -1

    def _check_group_indices(self, indices) -> None:
        if len(indices) != self.groups:
            raise ValueError(f"indices must hold one entry per group (groups == {self.groups}), got "
                             f"{short_repr(indices)}")

    def get_codes_from_indices(self, indices) -> Tensor:
        """indices (groups, B, ..., L) -> codes (groups, L, B, ..., codebook_dim)."""
        self._check_group_indices(indices)
        return torch.stack(tuple(rvq.get_codes_from_indices(chunk) for rvq, chunk in zip(self.rvqs, indices)))

    def get_output_from_indices(self, indices) -> Tensor:
        """indices (groups, B, ..., L) -> the groups' outputs concatenated along split_dim."""
        self._check_group_indices(indices)
        outputs = tuple(rvq.get_output_from_indices(chunk) for rvq, chunk in zip(self.rvqs, indices))
        return torch.cat(outputs, dim=self.split_dim)

    def forward(self, x: Tensor, indices=None, return_all_codes: bool = False, sample_codebook_temp=None,
                freeze_codebook: bool = False, mask: Tensor | None = None):
        check_float_tensor("x", x)
        split_dim = self.split_dim
        if x.dim() < 2 or x.shape[split_dim] != self.dim:
            raise ValueError(f"x must have dim == {self.dim} features along axis {split_dim}, got {short_repr(x)}")
        if indices is not None:
            raise ValueError("GroupedResidualVQ.forward(indices=...) is not implemented: vector-quantize-pytorch "
                             "1.32's fails on it too (its ResidualVQ unpacks two returns into three)")
        chunks = x.chunk(self.groups, dim=split_dim)
        seed = maybe_sync_seed(x.device) if self.training else None
        outputs = [rvq(chunk, mask=mask, return_all_codes=return_all_codes, sample_codebook_temp=sample_codebook_temp,
                       freeze_codebook=freeze_codebook, rand_quantize_dropout_fixed_seed=seed)
                   for rvq, chunk in itertools.zip_longest(self.rvqs, chunks)]
        quantized, all_indices, losses, *maybe_all_codes = tuple(zip(*outputs))
        return (torch.cat(quantized, dim=split_dim), torch.stack(all_indices), torch.stack(losses), *maybe_all_codes)
