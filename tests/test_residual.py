"""ResidualVQ against a chain of fastvq.reference steps and against vector-quantize-pytorch."""
from __future__ import annotations

import random

import pytest
import torch

from fastvq import GroupedResidualVQ, ResidualVQ, reference

from conftest import TOLERANCES

FP32 = TOLERANCES[torch.float32]


def data(num_rows, dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(10, dim, generator=generator)
    labels = torch.randint(0, 10, (num_rows,), generator=generator)
    return centres[labels] + torch.randn(num_rows, dim, generator=generator)


def test_levels_match_a_chain_of_reference_steps():
    torch.manual_seed(0)
    rvq = ResidualVQ(6, 12, 3, decay=0.7, commitment_weight=0.25, rotation_trick=False).train()
    states = [[layer._codebook.embed[0].clone(), layer._codebook.cluster_size[0].clone(),
               layer._codebook.embed_avg[0].clone()] for layer in rvq.layers]
    for step in range(3):
        x = data(50, 6, seed=step).view(5, 10, 6)
        quantized, indices, losses = rvq(x)
        assert quantized.shape == x.shape and indices.shape == (5, 10, 3) and losses.shape == (3,)
        residual, total = x.reshape(-1, 6), torch.zeros(50, 6)
        for level, state in enumerate(states):
            want_q, want_i, want_loss = reference.ema_vq_step(residual, *state, decay=0.7, eps=1e-5,
                                                              commitment_weight=0.25)
            torch.testing.assert_close(indices[..., level].reshape(-1), want_i, rtol=0, atol=0)
            torch.testing.assert_close(losses[level], want_loss, **FP32)
            torch.testing.assert_close(rvq.layers[level].codebook, state[0], **FP32)
            total, residual = total + want_q, residual - want_q
        torch.testing.assert_close(quantized, total.view(x.shape), **FP32)


def test_gradient_is_each_levels_straight_through_plus_its_commitment():
    torch.manual_seed(1)
    rvq = ResidualVQ(4, 8, 2, ema_update=False, learnable_codebook=True, commitment_weight=0.25, rotation_trick=False)
    x = data(30, 4, seed=1).requires_grad_()
    weights = torch.randn(30, 4)
    quantized, _, losses = rvq(x)
    ((quantized * weights).sum() + losses.sum()).backward()
    # plain torch, vqp's chain: r_0 = x, r_{i+1} = r_i − sg(q_i), quantized = Σ_i (r_i + sg(q_i − r_i)), so
    # each level passes the upstream gradient to x (L times in all); loss_i = w·mse(q_i, r_i), with
    # gradients to both r_i and the codes (vqp's learnable codebook: one term, no separate codebook loss)
    x_ref = x.detach().clone().requires_grad_()
    codebooks = [layer.codebook.detach().clone().requires_grad_() for layer in rvq.layers]
    residual, total, loss = x_ref, 0, 0
    for codes in codebooks:
        indices, _ = reference.nearest_code(residual.detach(), codes.detach())
        q = codes[indices]
        loss = loss + 0.25 * ((q - residual) ** 2).mean()
        total = total + residual + (q - residual).detach()
        residual = residual - q.detach()
    (total * weights).sum().add(loss).backward()
    torch.testing.assert_close(losses.sum(), loss.detach(), **FP32)
    torch.testing.assert_close(x.grad, x_ref.grad, **FP32)
    for layer, codes in zip(rvq.layers, codebooks):
        torch.testing.assert_close(layer._codebook.embed.grad[0], codes.grad, **FP32)


# The same kwargs for both libraries: the straight-through quantizer with explicit EMA settings, and
# vqp's defaults (each level then uses the rotation trick: the same values up to rounding).
VQP_KWARGS = {
    "straight-through": dict(dim=6, num_quantizers=3, codebook_size=10, decay=0.8, commitment_weight=1.0,
                             rotation_trick=False),
    "vqp-defaults": dict(dim=6, num_quantizers=3, codebook_size=10),
}


def residual_vq_pair(kwargs):
    """(fastvq's, vqp's) ResidualVQ, in training mode, with vqp's initial state loaded into fastvq's."""
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(2)
    ours, theirs = ResidualVQ(**kwargs).train(), vqp.ResidualVQ(**kwargs).train()
    ours.load_state_dict(theirs.state_dict())  # per level: layers.{i}._codebook.{initted,cluster_size,embed_avg,embed}
    return ours, theirs


@pytest.mark.parametrize("kwargs", list(VQP_KWARGS.values()), ids=list(VQP_KWARGS))
def test_matches_vector_quantize_pytorch_residual_vq(kwargs):
    ours, theirs = residual_vq_pair(kwargs)
    for step in range(2):
        x = data(40, 6, seed=10 + step).view(4, 10, 6)
        q_ours, i_ours, l_ours = ours(x)
        q_theirs, i_theirs, l_theirs = theirs(x)
        torch.testing.assert_close(i_ours, i_theirs, rtol=0, atol=0)
        torch.testing.assert_close(q_ours, q_theirs, **FP32)
        torch.testing.assert_close(l_ours, l_theirs, **FP32)
        theirs_state = theirs.state_dict()
        assert ours.state_dict().keys() == theirs_state.keys()
        for name, value in ours.state_dict().items():
            torch.testing.assert_close(value, theirs_state[name], **FP32, msg=name)
    torch.testing.assert_close(ours.get_codes_from_indices(i_ours), theirs.get_codes_from_indices(i_theirs), **FP32)


def test_input_gradient_matches_vector_quantize_pytorch_residual_vq():
    ours, theirs = residual_vq_pair(VQP_KWARGS["straight-through"])
    x = data(40, 6, seed=10).view(4, 10, 6)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(11))
    grads = []
    for module in (ours, theirs):
        x_in = x.clone().requires_grad_()
        quantized, _, losses = module(x_in)
        ((quantized * weights).sum() + losses.sum()).backward()
        grads.append(x_in.grad)
    torch.testing.assert_close(grads[0], grads[1], **FP32)


def test_codes_from_indices_rebuild_the_eval_output():
    torch.manual_seed(3)
    rvq = ResidualVQ(5, (7, 9, 3)).eval()
    x = data(21, 5, seed=3).view(3, 7, 5)
    quantized, indices, _ = rvq(x)
    codes = rvq.get_codes_from_indices(indices)
    assert codes.shape == (3, 3, 7, 5) and rvq.num_quantizers == 3
    torch.testing.assert_close(rvq.get_output_from_indices(indices), quantized, **FP32)
    with pytest.raises(ValueError, match=r"indices must have shape \(B, \.\.\., q\) with exactly num_quantizers == 3"):
        rvq.get_codes_from_indices(indices[..., :2])
    with pytest.raises(ValueError, match=r"indices of level 2 must lie in \[-1, 3\)"):
        rvq.get_codes_from_indices(torch.full_like(indices, 3))


def test_more_levels_reconstruct_better_after_training():
    torch.manual_seed(4)
    rvq = ResidualVQ(8, 16, 4, kmeans_init=True, decay=0.8).train()
    x = data(512, 8, seed=4)
    for _ in range(5):
        rvq(x)
    codes = rvq.get_codes_from_indices(rvq.eval()(x)[1])
    errors = [float(((x - codes[: level + 1].sum(0)) ** 2).mean()) for level in range(4)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_image_fmap_in_and_out():
    rvq = ResidualVQ(4, 8, 2, accept_image_fmap=True).eval()
    x = torch.randn(2, 4, 3, 5)
    quantized, indices, _ = rvq(x)
    assert quantized.shape == x.shape and indices.shape == (2, 3, 5, 2)
    flat = ResidualVQ(4, 8, 2).eval()
    flat.load_state_dict(rvq.state_dict())
    want_q, want_i, _ = flat(x.permute(0, 2, 3, 1))
    torch.testing.assert_close(quantized, want_q.permute(0, 3, 1, 2), rtol=0, atol=0)
    torch.testing.assert_close(indices, want_i, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beam", [None, 2])
def test_half_inputs(dtype, beam):
    rvq = ResidualVQ(8, 16, 3).train()
    x = data(40, 8, seed=5).to(dtype).requires_grad_()
    quantized, indices, losses, stats = rvq(x, beam_size=beam, return_stats=True)
    (quantized.float().sum() + losses.sum()).backward()
    assert quantized.dtype == dtype and x.grad.dtype == dtype and losses.dtype == torch.float32
    assert stats.perplexity.shape == (3,) and stats.counts.shape == (3, 16)
    assert bool(torch.isfinite(losses).all())


def test_beam_of_one_is_the_greedy_search():
    """The beam machinery itself (expand with nearest_codes, score, keep one) picks the greedy codes."""
    from fastvq.nn.beam_search import beam_search_forward

    torch.manual_seed(6)
    rvq = ResidualVQ(8, 33, 4, beam_size=3).eval()
    x = data(257, 8, seed=6).view(1, 257, 8)
    greedy_q, greedy_i, _, _ = rvq._greedy(x, None, None, False, None)
    beam_q, beam_i, beam_losses, _ = beam_search_forward(rvq, x, None, 1, False, None)
    torch.testing.assert_close(beam_i, greedy_i, rtol=0, atol=0)
    torch.testing.assert_close(beam_q, greedy_q, **FP32)
    want = torch.stack([((c - r) ** 2).mean() for c, r in _levels(rvq, x.reshape(-1, 8), greedy_i.reshape(-1, 4))])
    torch.testing.assert_close(beam_losses, want, **FP32)


def _levels(rvq, x, indices):
    """(code, residual) pairs level by level for the given indices."""
    residual = x
    for level, layer in enumerate(rvq.layers):
        codes = layer.codebook[indices[:, level]]
        yield codes, residual
        residual = residual - codes


@pytest.mark.parametrize("beam", [2, 4])
def test_beam_search_reconstructs_no_worse_than_greedy(beam):
    torch.manual_seed(7)
    rvq = ResidualVQ(6, 12, 3).eval()
    x = data(1030, 6, seed=7)
    greedy = ((rvq(x)[0] - x) ** 2).sum(-1)
    beamed = ((rvq(x, beam_size=beam)[0] - x) ** 2).sum(-1)
    # Beam search minimises the summed per-level losses, not the final error, so single rows may lose;
    # over 1030 rows it must not lose on average, and it must change some choices.
    assert float(beamed.mean()) <= float(greedy.mean()) + 1e-6
    assert not torch.equal(rvq(x, beam_size=beam)[1], rvq(x)[1])


def test_beam_wider_than_the_codebook_and_noncontiguous_input():
    torch.manual_seed(8)
    rvq = ResidualVQ(5, 3, 2, beam_size=8).train()
    x = data(66, 10, seed=8).view(2, 33, 10)[..., ::2]
    assert not x.is_contiguous()
    quantized, indices, losses = rvq(x.requires_grad_())
    (quantized.sum() + losses.sum()).backward()
    assert indices.shape == (2, 33, 2) and bool((indices >= 0).all()) and bool((indices < 3).all())
    assert x.grad.shape == x.shape and bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("shape", [(0, 12, 6), (2, 0, 6), (0, 6)])
@pytest.mark.parametrize("beam", [None, 2])
def test_empty_inputs(shape, beam):
    rvq = ResidualVQ(6, 8, 3).train()
    x = torch.randn(shape, requires_grad=True)
    quantized, indices, losses = rvq(x, beam_size=beam)
    (quantized.sum() + losses.sum()).backward()
    assert quantized.shape == x.shape and indices.shape == (*shape[:-1], 3)
    torch.testing.assert_close(losses, torch.zeros(3), rtol=0, atol=0)


def test_quantize_dropout_drops_the_levels_vqp_draws():
    rvq = ResidualVQ(4, 8, 6, quantize_dropout=True, quantize_dropout_cutoff_index=1,
                     quantize_dropout_multiple_of=2).train()
    x = data(20, 4, seed=9).view(2, 10, 4)
    for seed in range(8):
        level = random.Random(seed).randrange(1, 6)
        level = -(-(level + 1) // 2) * 2 - 1
        _, indices, losses = rvq(x, rand_quantize_dropout_fixed_seed=seed)
        kept = (indices[0, 0] >= 0).sum().item()
        assert kept == min(level + 1, 6) and kept % 2 == 0, (seed, kept)
        assert bool((indices[..., kept:] == -1).all()) and bool((losses[kept:] == 0).all())
    assert bool((rvq.eval()(x)[1] >= 0).all())  # no dropout in eval


def test_grouped_splits_features_into_independent_residual_vqs():
    torch.manual_seed(10)
    grouped = GroupedResidualVQ(dim=8, groups=2, num_quantizers=3, codebook_size=16).eval()
    x = data(24, 8, seed=10).view(2, 12, 8)
    quantized, indices, losses, codes = grouped(x, return_all_codes=True)
    assert indices.shape == (2, 2, 12, 3) and losses.shape == (2, 3) and isinstance(codes, tuple)
    for group, (rvq, chunk) in enumerate(zip(grouped.rvqs, x.chunk(2, dim=-1))):
        want_q, want_i, _ = rvq(chunk)
        torch.testing.assert_close(indices[group], want_i, rtol=0, atol=0)
        torch.testing.assert_close(quantized[..., 4 * group:4 * (group + 1)], want_q, rtol=0, atol=0)
    torch.testing.assert_close(grouped.get_output_from_indices(indices), quantized, **FP32)
    assert grouped.get_codes_from_indices(indices).shape == (2, 3, 2, 12, 4)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(dim=4, codebook_size=8), ValueError, "num_quantizers must be given"),
        (dict(dim=4, codebook_size=(8, 8), num_quantizers=3), ValueError, "one size per level"),
        (dict(dim=4, codebook_size=8, num_quantizers=0), ValueError, "num_quantizers must be a positive int"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, heads=2), ValueError, "heads=1 only"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, implicit_neural_codebook=True), ValueError,
         "implicit_neural_codebook=True"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, diveq=True), ValueError, "diveq=True"),
        (dict(dim=4, codebook_size=(8, 4), shared_codebook=True), ValueError, "one codebook size for all levels"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, eval_beam_size=2), ValueError, "eval_beam_size needs"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, beam_size=0), ValueError, "beam_size must be None or"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, quantize_dropout_cutoff_index=-1), ValueError,
         "quantize_dropout_cutoff_index must be an int >= 0"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, beam_score_quantizer_weights=[1.0]), ValueError,
         "one weight per level"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, codebook_dim=0), ValueError, "codebook_dim must be an int >= 1"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, codebook_dim=2.0), TypeError, "codebook_dim must be an int"),
        (dict(dim=0, codebook_size=8, num_quantizers=2), ValueError, "dim must be an int >= 1, got 0"),
        (dict(dim=4.0, codebook_size=8, num_quantizers=2), TypeError, "dim must be an int, got 4.0"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, no_such_argument=1), TypeError, "no_such_argument"),
    ],
)
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        ResidualVQ(**kwargs)


def test_bad_forward_calls():
    x = torch.randn(2, 5, 4)
    rvq = ResidualVQ(4, 8, 2, quantize_dropout=True, quantize_dropout_cutoff_index=2).train()
    with pytest.raises(ValueError, match=r"quantize_dropout_cutoff_index must be in \[0, num_quantizers\)"):
        rvq(x)
    with pytest.raises(ValueError, match="fails on it too"):
        rvq.eval()(x, indices=torch.zeros(2, 5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(B, N\)"):
        rvq(x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="beam_size must be None or an int >= 1"):
        rvq(x, beam_size=0)
    with pytest.raises(ValueError, match="commitment_weight > 0"):
        ResidualVQ(4, 8, 2, commitment_weight=0.0).train()(x, beam_size=2)
    with pytest.raises(ValueError, match="channel-last inputs"):
        ResidualVQ(4, 8, 2, accept_image_fmap=True)(torch.randn(2, 4, 3, 3), beam_size=2)
    for name, kwargs in (("commitment_use_cross_entropy_loss", {}), ("straight_through", dict(rotation_trick=False))):
        with pytest.raises(ValueError, match=f"beam search in training with {name}=True is not supported"):
            ResidualVQ(4, 8, 2, **{name: True}, **kwargs).train()(x, beam_size=2)
    with pytest.raises(ValueError, match="dim must be divisible by groups"):
        GroupedResidualVQ(dim=6, groups=4, num_quantizers=2, codebook_size=8)
    with pytest.raises(ValueError, match="dim must be an int >= 1, got 0"):
        GroupedResidualVQ(dim=0, groups=1, num_quantizers=2, codebook_size=8)
    with pytest.raises(ValueError, match="groups must be an int >= 1, got 0"):
        GroupedResidualVQ(dim=4, groups=0, num_quantizers=2, codebook_size=8)
    with pytest.raises(TypeError, match="groups must be an int, got True"):
        GroupedResidualVQ(dim=4, groups=True, num_quantizers=2, codebook_size=8)
    with pytest.raises(ValueError, match="dim == 8 features along axis -1"):
        GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=8)(x)
    with pytest.raises(TypeError, match="indices must be an int64 or int32 tensor"):
        rvq.get_codes_from_indices(torch.zeros(2, 2))


def test_channel_first_sequences_match_the_channel_last_layout():
    torch.manual_seed(11)
    first = ResidualVQ(4, 8, 3, channel_last=False).eval()
    last = ResidualVQ(4, 8, 3).eval()
    last.load_state_dict(first.state_dict())
    x = torch.randn(2, 4, 7)
    quantized, indices, _ = first(x)
    want_q, want_i, _ = last(x.transpose(1, 2))
    torch.testing.assert_close(quantized, want_q.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(indices, want_i, rtol=0, atol=0)


def test_beam_search_kmeans_init_takes_every_unmasked_beam_row():
    torch.manual_seed(12)
    rvq = ResidualVQ(6, 8, 2, kmeans_init=True, beam_size=2).train()
    x = data(60, 6, seed=12).view(3, 20, 6)
    mask = torch.arange(20) < torch.tensor([20, 9, 14])[:, None]
    quantized, indices, losses = rvq(x, mask=mask)
    assert bool(rvq.layers[0]._codebook.initted) and bool(rvq.layers[1]._codebook.initted)
    assert bool((indices[~mask] == -1).all()) and bool((indices[mask] >= 0).all())
    assert bool((quantized[~mask] == 0).all()) and bool(torch.isfinite(losses).all())


def test_shared_codebook_dead_codes_from_feature_maps_take_channel_vectors():
    """vqp 1.32 folds feature maps as if the last axis were the features (and fails unless C == H == W);
    fastvq revives dead codes with channel vectors of the first image's level inputs."""
    torch.manual_seed(13)
    # 64 dead codes, 30 rows per level: the last level revives 30, the end of the step some of the other 34
    rvq = ResidualVQ(4, 64, 2, accept_image_fmap=True, shared_codebook=True, threshold_ema_dead_code=100).train()
    x = torch.randn(2, 4, 3, 5)
    rvq(x)
    first_image = x[0].permute(1, 2, 0).reshape(-1, 4)  # level 0's input rows of image 0
    second_image = x[1].permute(1, 2, 0).reshape(-1, 4)
    codes = rvq.layers[0].codebook
    revived = [bool(((rows - code).abs().amax(1) < 1e-6).any()) for code in codes for rows in (first_image,)]
    assert any(revived), "no dead code was replaced by a channel vector of the first image's level-0 input"
    assert not any(bool(((second_image - code).abs().amax(1) < 1e-6).any()) for code in codes)
