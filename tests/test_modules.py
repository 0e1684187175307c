"""FastVectorQuantizer's core contract (issue 2), on every (backend, device) pair: the module is
moved to the pair's device, inputs are built on the CPU and moved, results compared on the CPU.

The module is vector-quantize-pytorch 1.32's VectorQuantize (issue 10): its state lives in
``module._codebook`` as (C, K[, d]) buffers (C = 1 here, so ``[0]`` is the codebook), and a test
that compares with fastvq.reference passes the settings the oracle assumes (straight-through,
its decay and commitment weight) explicitly instead of relying on the defaults."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastvq import FastVectorQuantizer, reference

from conftest import TOLERANCES, backend_or_skip, randn, skip_on_interpreter, to_cpu

FP32 = TOLERANCES[torch.float32]

# vqp 1.32's state_dict keys of a VectorQuantize without projections, EMA or learnable alike.
CODEBOOK_STATE_KEYS = {"_codebook.initted", "_codebook.cluster_size", "_codebook.embed_avg", "_codebook.embed"}

# What fastvq.reference.ema_vq_step computes: a straight-through quantizer with this commitment weight.
ORACLE_SETTINGS = dict(rotation_trick=False, commitment_weight=0.25)


def clustered_batches(num_batches, num_rows, dim, num_clusters=8, seed=0):
    """Points near a few centres, so nearest codes are decided by wide margins."""
    generator = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(num_clusters, dim, generator=generator)
    labels = torch.randint(0, num_clusters, (num_batches, num_rows), generator=generator)
    return centres[labels] + 0.3 * torch.randn(num_batches, num_rows, dim, generator=generator)


EMA_STEP_CASES = {  # name: (dim, codebook_size, batches as (num_batches, rows, dim) on the CPU)
    "clustered": (16, 33, lambda: clustered_batches(6, 257, 16)),
    "gaussian": (33, 257, lambda: torch.stack([randn(300, 33, seed=100 + step) for step in range(2)])),
}


@pytest.mark.parametrize("case", list(EMA_STEP_CASES))
def test_ema_steps_match_reference_step_for_step(pair, case):
    dim, codebook_size, make_batches = EMA_STEP_CASES[case]
    torch.manual_seed(0)
    module = FastVectorQuantizer(dim, codebook_size, decay=0.9, **ORACLE_SETTINGS, backend=pair.backend).train()
    state = module._codebook
    embed, cluster_size, embed_avg = (state.embed[0].clone(), state.cluster_size[0].clone(), state.embed_avg[0].clone())
    module.to(pair.device)
    for batch in make_batches():
        rows = batch.shape[0]
        x = pair.to(batch.reshape(1, rows, dim)).requires_grad_()
        quantized, indices, loss = to_cpu(*module(x))
        want_quantized, want_indices, want_loss = reference.ema_vq_step(
            batch, embed, cluster_size, embed_avg, decay=0.9, eps=1e-5, commitment_weight=0.25
        )
        assert indices.shape == (1, rows) and quantized.shape == x.shape and loss.dim() == 0
        torch.testing.assert_close(indices.reshape(-1), want_indices, rtol=0, atol=0)
        # After the first step the codebooks differ by float32 summation order only.
        torch.testing.assert_close(quantized.reshape(-1, dim), want_quantized, **FP32)
        torch.testing.assert_close(loss, want_loss, **FP32)
        torch.testing.assert_close(state.cluster_size[0].cpu(), cluster_size, **FP32)
        torch.testing.assert_close(state.embed_avg[0].cpu(), embed_avg, **FP32)
        torch.testing.assert_close(state.embed[0].cpu(), embed, **FP32)
    assert not torch.equal(state.cluster_size[0].cpu(), torch.ones(codebook_size))  # it did learn


def test_quantized_uses_pre_update_codebook(pair):
    module = FastVectorQuantizer(4, 8, decay=0.5, backend=pair.backend).train().to(pair.device)
    before = module.codebook.clone()
    x = pair.to(randn(3, 100, 4, seed=0))
    quantized, indices, _ = module(x)
    torch.testing.assert_close(quantized, before[indices], rtol=0, atol=0)
    assert not torch.equal(module.codebook, before)


def test_eval_mode_changes_nothing(pair):
    module = FastVectorQuantizer(8, 16, backend=pair.backend).eval().to(pair.device)
    state = copy.deepcopy(module.state_dict())
    quantized, indices, loss = module(pair.to(randn(4, 9, 8, seed=1)))
    for name, value in module.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)
    torch.testing.assert_close(quantized, module.codebook[indices], rtol=0, atol=0)
    assert loss.dim() == 0 and float(loss) == 0.0  # vqp's eval loss


def test_training_loss_keeps_its_value_when_x_needs_no_gradient(pair):
    # vqp returns the commitment loss in training whether or not x requires grad, and backward() accepts it.
    module = FastVectorQuantizer(4, 8, commitment_weight=0.25, backend=pair.backend).train().to(pair.device)
    before = module.codebook.clone()
    x = pair.to(randn(3, 20, 4, seed=9))
    _, indices, loss = module(x)
    want = 0.25 * ((x.double() - before.double()[indices]) ** 2).mean()
    torch.testing.assert_close(loss.detach().cpu().double(), want.cpu(), **FP32)
    assert loss.requires_grad
    loss.backward()


def test_learnable_codebook_trains_a_small_autoencoder(pair):
    skip_on_interpreter(pair, "300 training steps")
    torch.manual_seed(0)
    dim, codebook_size = 8, 16
    data = pair.to(clustered_batches(1, 512, 12, num_clusters=6, seed=1)[0])
    encoder, decoder = nn.Linear(12, dim).to(pair.device), nn.Linear(dim, 12).to(pair.device)
    vq = FastVectorQuantizer(dim, codebook_size, ema_update=False, learnable_codebook=True,
                             backend=pair.backend).to(pair.device)
    # vqp's learnable codebook: embed is the only parameter; the (unused) EMA buffers stay, so a
    # checkpoint has vqp's keys whichever way the codebook learns.
    assert isinstance(vq._codebook.embed, nn.Parameter) and [n for n, _ in vq.named_parameters()] == ["_codebook.embed"]
    assert set(vq.state_dict()) == CODEBOOK_STATE_KEYS
    start_codebook = vq.codebook.detach().clone()
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters(), *vq.parameters()], lr=1e-2)

    def step():
        quantized, _, vq_loss = vq(encoder(data))
        reconstruction = ((decoder(quantized) - data) ** 2).mean()
        optimizer.zero_grad()
        (reconstruction + vq_loss).backward()
        optimizer.step()
        return reconstruction.item(), vq_loss.item()

    first_reconstruction, first_vq = step()
    assert vq._codebook.embed.grad is not None and vq._codebook.embed.grad.abs().sum() > 0
    for _ in range(300):
        reconstruction, vq_loss = step()
    assert reconstruction < 0.2 * first_reconstruction
    assert vq_loss < first_vq
    assert (vq.codebook.detach() - start_codebook).abs().max() > 0.1


def test_learnable_loss_is_the_commitment_term_with_gradients_to_both(pair):
    # vqp 1.32: a learnable codebook's loss is commitment_weight · mse(q, x), one term whose gradient
    # reaches both x and the codebook (no separate codebook term of weight 1).
    vq = FastVectorQuantizer(4, 8, commitment_weight=0.25, ema_update=False, learnable_codebook=True,
                             backend=pair.backend).train().to(pair.device)
    x = pair.to(randn(50, 4, seed=2)).requires_grad_()
    _, indices, loss = vq(x)
    loss.backward()
    x64, codebook64, indices = x.detach().cpu().double(), vq.codebook.detach().cpu().double(), indices.cpu()
    residual = x64 - codebook64[indices]
    want_loss = 0.25 * (residual**2).mean()
    want_grad_x = 0.25 * 2 * residual / residual.numel()
    want_grad_codebook = torch.zeros_like(codebook64).index_add_(0, indices, -want_grad_x)
    torch.testing.assert_close(loss.detach().cpu().double(), want_loss, **FP32)
    torch.testing.assert_close(x.grad.cpu().double(), want_grad_x, **FP32)
    torch.testing.assert_close(vq._codebook.embed.grad[0].cpu().double(), want_grad_codebook, **FP32)


CODEBOOK_KINDS = {"ema": dict(), "frozen_buffer": dict(ema_update=False),
                  "learnable": dict(ema_update=False, learnable_codebook=True)}


@pytest.mark.parametrize("kind", list(CODEBOOK_KINDS))
def test_state_dict_round_trip(pair, kind):
    kwargs = CODEBOOK_KINDS[kind]
    torch.manual_seed(1)
    trained = FastVectorQuantizer(8, 16, **kwargs, backend=pair.backend).train().to(pair.device)
    for batch in clustered_batches(3, 64, 8):
        trained(pair.to(batch))
    fresh = FastVectorQuantizer(8, 16, **kwargs, backend=pair.backend).to(pair.device)
    fresh.load_state_dict(trained.state_dict())
    assert set(trained.state_dict()) == CODEBOOK_STATE_KEYS  # vqp's keys, however the codebook learns
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value, rtol=0, atol=0)
    x = pair.to(randn(5, 8, seed=3))
    for a, b in zip(trained.eval()(x), fresh.eval()(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_set_codebook_resets_ema_state(pair):
    module = FastVectorQuantizer(4, 8, backend=pair.backend).train().to(pair.device)
    module(pair.to(randn(40, 4, seed=4)))
    codebook = pair.to(randn(8, 4, seed=5))
    module.set_codebook(codebook)
    state = module._codebook
    torch.testing.assert_close(state.embed[0], codebook, rtol=0, atol=0)
    torch.testing.assert_close(state.embed_avg[0], codebook, rtol=0, atol=0)
    torch.testing.assert_close(state.cluster_size[0], pair.to(torch.ones(8)), rtol=0, atol=0)
    assert bool(state.initted)
    with pytest.raises(ValueError, match=r"codebook must have shape \(8, 4\)"):
        module.set_codebook(pair.to(randn(8, 5, seed=6)))


def test_get_codes_from_indices(pair):
    module = FastVectorQuantizer(4, 8, backend=pair.backend).to(pair.device)
    indices = pair.to(torch.tensor([[0, 7], [3, 3]]))
    torch.testing.assert_close(module.get_codes_from_indices(indices), module.codebook[indices], rtol=0, atol=0)


# On the CPU only: an out-of-range index on a GPU is a device-side assert that ends the process's CUDA context.
def test_get_codes_from_indices_rejects_out_of_range_indices():
    module = FastVectorQuantizer(4, 8)
    for bad in (8, -9, 2**40):
        with pytest.raises(ValueError, match="indices must lie in"):
            module.get_codes_from_indices(torch.tensor([bad]))
    # vqp's torch indexing: -1 (a masked position's index) is the last code.
    torch.testing.assert_close(module.get_codes_from_indices(torch.tensor([-1])), module.codebook[[-1]],
                               rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_compute_in_float32(pair, dtype):
    module = FastVectorQuantizer(8, 16, backend=pair.backend).train().to(pair.device)
    x = pair.to(randn(3, 50, 8, seed=7, dtype=dtype)).requires_grad_()
    pair.require(x, module.codebook)
    quantized, indices, loss = module(x)
    assert quantized.dtype == dtype and module.codebook.dtype == torch.float32
    quantized.float().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(loss)


def test_cpu_results_are_bitwise_identical_for_one_and_two_threads():
    # Thread counts matter only to the cpu kernels (GPU reductions use atomics unless deterministic).
    backend = backend_or_skip("cpu", torch.empty(1, 1))

    def train(num_threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(num_threads)
        try:
            torch.manual_seed(3)
            module = FastVectorQuantizer(32, 1030, backend=backend).train()
            outputs = [module(batch) for batch in clustered_batches(3, 4099, 32, seed=4)]
            return outputs, module.state_dict()
        finally:
            torch.set_num_threads(previous)

    (outputs_1, state_1), (outputs_2, state_2) = train(1), train(2)
    for out_1, out_2 in zip(outputs_1, outputs_2):
        for a, b in zip(out_1, out_2):
            assert torch.equal(a, b)
    for name in state_1:
        assert torch.equal(state_1[name], state_2[name]), name


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(dim=0, codebook_size=8), ValueError, "dim must be an int >= 1, got 0"),
        (dict(dim=4, codebook_size=0), ValueError, "codebook_size must be an int >= 1, got 0"),
        (dict(dim=4, codebook_size=-3), ValueError, "codebook_size must be an int >= 1, got -3"),
        (dict(dim=4, codebook_size=8.0), TypeError, "codebook_size must be an int, got 8.0"),
        (dict(dim=4, codebook_size=8, decay=1.5), ValueError,
         r"decay must be a finite number in \[0.0, 1.0\], got 1.5"),
        (dict(dim=4, codebook_size=8, backend="nope"), ValueError, "backend must be 'auto' or one of .*, got 'nope'"),
        (dict(dim=4, codebook_size=8, backend=3), TypeError, "backend must be a str, got int"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        FastVectorQuantizer(**kwargs)


def test_bad_forward_input(pair):
    module = FastVectorQuantizer(64, 8, backend=pair.backend).to(pair.device)
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, dim\), \(B, \.\.\., dim\) or \(B, dim\) "
                                         r"with dim == 64, got \(2, 10, 63\)"):
        module(pair.to(randn(2, 10, 63, seed=8)))
    with pytest.raises(ValueError, match=r"x must have shape .* with dim == 64, got \(64,\)"):
        module(pair.to(randn(64, seed=8)))  # one vector needs its batch axis: (1, 64)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        module(pair.to(torch.zeros(2, 64, dtype=torch.int64)))
