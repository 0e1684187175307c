"""The oracle itself: gradients by gradcheck, the EMA formula by hand-worked numbers."""
from __future__ import annotations

import pytest
import torch

from fastvq import reference

from conftest import TOLERANCES


def well_separated(num_rows=6, num_codes=4, dim=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    codebook = torch.randn(num_codes, dim, generator=generator, dtype=torch.float64) * 4
    x = codebook[torch.arange(num_rows) % num_codes] + 0.1 * torch.randn(num_rows, dim, generator=generator, dtype=torch.float64)
    return x, codebook


def test_gradcheck_commitment_loss_wrt_x():
    x, codebook = well_separated()
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: reference.quantize(x, codebook, 0.25, 0.0)[2], (x,))


def test_gradcheck_codebook_loss_wrt_codebook():
    x, codebook = well_separated(seed=1)
    codebook.requires_grad_()
    assert torch.autograd.gradcheck(lambda e: reference.quantize(x, e, 0.0, 1.0)[2], (codebook,))


def test_straight_through_is_identity_and_codebook_gets_only_the_loss_gradient():
    x, codebook = well_separated(seed=2)
    x.requires_grad_(), codebook.requires_grad_()
    quantized, indices, loss = reference.quantize(x, codebook, 0.25, 1.0)
    torch.testing.assert_close(quantized.detach(), codebook.detach()[indices], **TOLERANCES["float64_roundings"])
    upstream = torch.randn_like(x)
    grad_x, grad_codebook = torch.autograd.grad((quantized * upstream).sum(), (x, codebook), allow_unused=True)
    torch.testing.assert_close(grad_x, upstream)
    assert grad_codebook is None


def test_hand_written_backward_matches_autograd():
    x, codebook = well_separated(num_rows=9, seed=3)
    x.requires_grad_(), codebook.requires_grad_()
    quantized, indices, loss = reference.quantize(x, codebook, 0.25, 1.0)
    upstream = torch.randn_like(x)
    grad_x, grad_codebook = torch.autograd.grad((quantized * upstream).sum() + 2.0 * loss, (x, codebook))
    scale = 2.0 * 2.0 / x.numel()
    mine_x, mine_codebook = reference.quantize_backward(
        upstream, x.detach(), codebook.detach(), indices,
        torch.tensor(0.25 * scale, dtype=torch.float64), torch.tensor(1.0 * scale, dtype=torch.float64),
    )
    torch.testing.assert_close(mine_x, grad_x)
    torch.testing.assert_close(mine_codebook, grad_codebook)


def test_nearest_code_small_example():
    codebook = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    x = torch.tensor([[1.9, 0.1], [0.2, 1.5], [1.0, 0.0], [5.0, 5.0]])
    indices, sqdist = reference.nearest_code(x, codebook)
    assert indices.tolist() == [1, 2, 0, 1]  # row 2 ties between 0 and 1 (and 3): lowest wins
    torch.testing.assert_close(sqdist, torch.tensor([0.02, 0.29, 1.0, 34.0]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rule_in_float64(bad):
    # The rule every backend is judged by (README "Non-finite inputs"), in the oracle's own float64:
    # a non-finite distance counts as +inf, so bad codes never win and bad rows of x get index 0.
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(-4, 5, (37, 19), generator=generator).double()
    codebook = torch.randint(-4, 5, (45, 19), generator=generator).double()
    clean_indices, clean_sqdist = reference.nearest_code(x[2:], codebook[4:])
    codebook[:4, 3] = bad
    x[:2, 5] = bad
    indices, sqdist = reference.nearest_code(x, codebook)
    assert indices[:2].tolist() == [0, 0] and not bool(torch.isfinite(sqdist[:2]).any())
    torch.testing.assert_close(indices[2:], clean_indices + 4, rtol=0, atol=0)
    torch.testing.assert_close(sqdist[2:], clean_sqdist, rtol=0, atol=0)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_ema_update_hand_worked(eps):
    embed = torch.tensor([[1.0], [3.0]])
    cluster_size = torch.tensor([1.0, 1.0])
    embed_avg = embed.clone()
    counts, sums = torch.tensor([3.0, 0.0]), torch.tensor([[6.0], [0.0]])
    reference.ema_update(embed, cluster_size, embed_avg, counts, sums, decay=0.5, eps=eps)
    # cluster_size = 0.5·1 + 0.5·n, embed_avg = 0.5·avg + 0.5·s
    torch.testing.assert_close(cluster_size, torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(embed_avg, torch.tensor([[3.5], [1.5]]))
    total = 2.5
    smoothed = [(2.0 + eps) / (total + 2 * eps) * total, (0.5 + eps) / (total + 2 * eps) * total]
    torch.testing.assert_close(embed, torch.tensor([[3.5 / smoothed[0]], [1.5 / smoothed[1]]]))


def test_unchosen_code_keeps_its_value_from_the_start_state():
    embed = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    cluster_size, embed_avg = torch.ones(2), embed.clone()
    x = torch.tensor([[0.5, 0.0], [0.0, 0.5]])
    reference.ema_vq_step(x, embed, cluster_size, embed_avg, decay=0.9, eps=0.0, commitment_weight=0.25)
    # code 1: cluster_size 0.9, embed_avg 0.9·(10, 10): ratio unchanged when eps = 0
    torch.testing.assert_close(embed[1], torch.tensor([10.0, 10.0]))
    torch.testing.assert_close(embed[0], torch.tensor([0.05, 0.05]) / 1.1)


@pytest.mark.parametrize("num_rows", [0, 3])
def test_ema_update_keeps_codes_without_statistics(num_rows):
    # decay = 0 and eps = 0: an unchosen code (or every code, for an empty batch) has ñ = 0.
    embed = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    cluster_size, embed_avg = torch.ones(2), embed.clone()
    x = torch.zeros(num_rows, 2) + torch.tensor([1.5, 2.5])
    reference.ema_vq_step(x, embed, cluster_size, embed_avg, decay=0.0, eps=0.0, commitment_weight=0.25)
    expected_first = [1.5, 2.5] if num_rows else [1.0, 2.0]
    torch.testing.assert_close(embed, torch.tensor([expected_first, [3.0, 4.0]]))
