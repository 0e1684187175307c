"""ResidualVQ's greedy training step as one autograd node (fastvq/nn/greedy_levels.py) against the
per-level graph it replaces: the same outputs, indices, losses and buffers bitwise, the same input
gradient to float32 rounding (the levels' terms are summed in another order), and none of the
levels' (N, d) residuals kept for the backward."""
from __future__ import annotations

import pytest
import torch

import fastvq.nn.residual as residual_module
from fastvq import ResidualVQ

from conftest import TOLERANCES

FP32 = TOLERANCES[torch.float32]
DIM = 8

CASES = {
    "defaults": (dict(), (3, 20, DIM), {}),
    "rotation_trick_off": (dict(rotation_trick=False), (3, 20, DIM), {}),
    "quantize_dropout": (dict(num_quantizers=5, quantize_dropout=True), (3, 20, DIM),
                         dict(rand_quantize_dropout_fixed_seed=2)),
    "dead_codes_kmeans_init": (dict(threshold_ema_dead_code=2, kmeans_init=True, kmeans_iters=3), (4, 30, DIM), {}),
    "projections": (dict(codebook_dim=4), (3, 20, DIM), {}),
    "commitment_off": (dict(commitment_weight=0.0), (3, 20, DIM), {}),
    "frozen_codebook": (dict(), (3, 20, DIM), dict(freeze_codebook=True)),
    "one_token_rows": (dict(), (25, DIM), {}),
}


def run_steps(kwargs, shape, forward_kwargs, fused: bool, monkeypatch, loss_only=False, transposed=False):
    torch.manual_seed(0)
    rvq = ResidualVQ(**{"dim": DIM, "num_quantizers": 3, "codebook_size": 16, **kwargs}).train()
    taken = []
    real = residual_module.can_fuse_levels
    monkeypatch.setattr(residual_module, "can_fuse_levels",
                        lambda *args: taken.append(real(*args)) or (fused and taken[-1]))
    results = []
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(shape, generator=generator)
        x.view(-1, DIM)[1] = 0.0  # the rotation trick's safe division: these rows get vqp's value
        x.view(-1, DIM)[2] *= 1e-9
        x = x.transpose(0, 1).contiguous().transpose(0, 1) if transposed else x
        x.requires_grad_()
        upstream = torch.randn(shape, generator=generator)
        torch.manual_seed(100 + step)
        quantized, indices, losses = rvq(x, **forward_kwargs)
        if loss_only:
            losses.sum().backward()
        else:
            torch.autograd.backward([quantized, losses], [upstream, torch.arange(1.0, losses.numel() + 1)])
        results.append((quantized.detach(), indices, losses.detach(), x.grad))
    monkeypatch.setattr(residual_module, "can_fuse_levels", real)
    return results, rvq.state_dict(), all(taken)


@pytest.mark.parametrize("name", CASES)
def test_fused_step_matches_the_per_level_graph(name, monkeypatch):
    kwargs, shape, forward_kwargs = CASES[name]
    fused, fused_state, took_fused = run_steps(kwargs, shape, forward_kwargs, True, monkeypatch)
    graph, graph_state, _ = run_steps(kwargs, shape, forward_kwargs, False, monkeypatch)
    assert took_fused
    for step, (got, want) in enumerate(zip(fused, graph)):
        for what, a, b in zip(("quantized", "indices", "losses"), got[:3], want[:3]):
            assert torch.equal(a, b), f"step {step}: {what} differ"
        torch.testing.assert_close(got[3], want[3], **FP32, msg=f"step {step}: input gradient")
    for key, value in graph_state.items():
        assert torch.equal(fused_state[key], value), f"buffer {key} differs"


@pytest.mark.parametrize("loss_only, transposed", [(True, False), (False, True)])
def test_fused_step_gradient_of_losses_only_and_of_a_strided_input(loss_only, transposed, monkeypatch):
    runs = [run_steps({}, (3, 20, DIM), {}, fused, monkeypatch, loss_only, transposed)[0] for fused in (True, False)]
    for got, want in zip(*runs):
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[3], want[3], **FP32)


def test_fused_step_keeps_no_residual_per_level():
    num_rows, levels, codes = 256, 6, 32
    saved = []

    def pack(tensor):
        saved.append(tensor.untyped_storage().nbytes())
        return tensor

    torch.manual_seed(0)
    rvq = ResidualVQ(dim=DIM, num_quantizers=levels, codebook_size=codes).train()
    x = torch.randn(1, num_rows, DIM, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        quantized, _, losses = rvq(x)
    # x itself, then per level its codebook (K, d) and indices (N,): no (N, d) residual per level
    assert sum(saved) <= x.numel() * 4 + levels * (codes * DIM * 4 + num_rows * 8)
    (quantized.sum() + losses.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kwargs, forward_kwargs", [
    (dict(use_cosine_sim=True), {}), (dict(shared_codebook=True), {}), (dict(quant_grad_frac=0.5), {}),
    (dict(learnable_codebook=True, ema_update=False), {}), (dict(straight_through=True,
     rotation_trick=False), {}), ({}, dict(mask=torch.ones(2, 5, dtype=torch.bool)))])
def test_other_configurations_keep_the_per_level_graph(kwargs, forward_kwargs):
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=16, **kwargs).train()
    x = torch.randn(2, 5, DIM, requires_grad=True)
    assert not residual_module.can_fuse_levels(rvq, x, forward_kwargs.get("mask"))
    rvq(x, **forward_kwargs)


def test_a_forward_hook_on_a_level_keeps_the_per_level_graph():
    rvq = ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=16).train()
    x = torch.randn(2, 5, DIM, requires_grad=True)
    assert residual_module.can_fuse_levels(rvq, x, None)
    seen = []
    rvq.layers[1].register_forward_hook(lambda module, args, output: seen.append(output[1].shape))
    assert not residual_module.can_fuse_levels(rvq, x, None)
    rvq(x)
    assert seen == [(2, 5)]


def _level_inputs(num_rows, dim, num_codes, seed):
    generator = torch.Generator().manual_seed(seed)
    codebook = torch.randn(num_codes, dim, generator=generator)
    indices = torch.randint(num_codes, (num_rows,), generator=generator)
    residual = torch.randn(num_rows, dim, generator=generator)
    if num_rows >= 3:  # the rotation trick's tiny rows (|residual| < 1e-6): zero, and ~1e-9
        residual[1] = 0.0
        residual[2] *= 1e-9
    grad_quantized = torch.randn(num_rows, dim, generator=generator)
    grad_x = torch.randn(num_rows, dim, generator=generator)
    return grad_x, residual, grad_quantized, codebook, indices


@pytest.mark.parametrize("rotation_trick", [True, False])
@pytest.mark.parametrize("accumulate, advance", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("num_rows, dim, num_codes", [(0, 3, 5), (1, 1, 1), (4, 3, 5), (33, 33, 3), (1030, 8, 257)])
def test_fused_level_backward_is_bitwise_the_composite_one(rotation_trick, accumulate, advance, num_rows, dim,
                                                           num_codes, monkeypatch):
    """The cpu kernel of ops.residual_level_backward_ against the op's composite path (quantize_backward and
    torch ops, as every other backend runs it), on the same inputs: the same bits in both outputs."""
    from fastvq import ops
    from fastvq.backends.cpu import CpuBackend

    scale = torch.tensor(0.37)
    fused = _level_inputs(num_rows, dim, num_codes, seed=num_rows)
    ops.residual_level_backward_(*fused[:2], *fused[2:], scale, "cpu", rotation_trick, accumulate, advance)
    monkeypatch.setattr(CpuBackend, "residual_level_backward_", lambda self, *args: None)
    composite = _level_inputs(num_rows, dim, num_codes, seed=num_rows)
    ops.residual_level_backward_(*composite[:2], *composite[2:], scale, "cpu", rotation_trick, accumulate, advance)
    assert torch.equal(fused[0], composite[0]), "grad_x differs"
    assert torch.equal(fused[1], composite[1]), "residual differs"
    if advance and num_rows >= 4:  # the zero row: the rotation trick's value there is 0, not the code
        want = torch.zeros(dim) if rotation_trick else -fused[3][fused[4][1]]
        assert torch.equal(fused[1][1], want)
