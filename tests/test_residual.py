"""ResidualVQ against a chain of fastvq.reference steps and against vector-quantize-pytorch."""
from __future__ import annotations

import pytest
import torch

from fastvq import ResidualVQ, reference

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


def test_gradient_is_straight_through_plus_each_levels_commitment():
    torch.manual_seed(1)
    rvq = ResidualVQ(4, 8, 2, ema_update=False, learnable_codebook=True, commitment_weight=0.25, rotation_trick=False)
    x = data(30, 4, seed=1).requires_grad_()
    weights = torch.randn(30, 4)
    quantized, _, losses = rvq(x)
    ((quantized * weights).sum() + losses.sum()).backward()
    # plain torch: q_sum = x + sg(Σ q − x); loss_i = w·mse(q_i, r_i) on r_i = x − Σ_{j<i} sg(q_j), with
    # gradients to both r_i and the codes (vqp's learnable codebook: one term, no separate codebook loss)
    x_ref = x.detach().clone().requires_grad_()
    codebooks = [layer.codebook.detach().clone().requires_grad_() for layer in rvq.layers]
    residual, total, loss = x_ref, 0, 0
    for codes in codebooks:
        indices, _ = reference.nearest_code(residual.detach(), codes.detach())
        q = codes[indices]
        loss = loss + 0.25 * ((q - residual) ** 2).mean()
        total = total + q.detach()
        residual = residual - q.detach()
    ((x_ref + (total - x_ref).detach()) * weights).sum().add(loss).backward()
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


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="issue #11: vqp's ResidualVQ passes each level's straight-through gradient to x "
                          "(num_quantizers × the upstream gradient), fastvq's passes it once")
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
    with pytest.raises(ValueError, match=r"indices must have shape \(\.\.\., num_quantizers\) with num_quantizers == 3"):
        rvq.get_codes_from_indices(indices[..., :2])


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
def test_half_inputs(dtype):
    rvq = ResidualVQ(8, 16, 3).train()
    x = data(40, 8, seed=5).to(dtype).requires_grad_()
    quantized, indices, losses, stats = rvq(x, return_stats=True)
    (quantized.float().sum() + losses.sum()).backward()
    assert quantized.dtype == dtype and x.grad.dtype == dtype and losses.dtype == torch.float32
    assert stats.perplexity.shape == (3,) and stats.counts.shape == (3, 16)
    assert bool(torch.isfinite(losses).all())


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(dim=4, codebook_size=8), ValueError, "num_quantizers must be given"),
        (dict(dim=4, codebook_size=(8, 8), num_quantizers=3), ValueError, "one size per level"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, codebook_dim=2), ValueError, "codebook_dim must be None"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, quantize_dropout=True), ValueError, "quantize_dropout=True"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, heads=2), ValueError, "heads=2"),
        (dict(dim=4, codebook_size=8, num_quantizers=0), ValueError, "num_quantizers must be a positive int"),
    ],
)
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        ResidualVQ(**kwargs)
