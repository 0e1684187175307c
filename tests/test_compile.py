"""torch.compile(fullgraph=True) through FastVectorQuantizer, and torch.library.opcheck on every custom op.

Compiling is slow on a 2-core machine, so there are few, small models: the eager-vs-compiled
comparisons use the aot_eager backend (Dynamo + AOTAutograd, the parts that find graph breaks
and check the ops' fake and autograd registrations); one test runs the default inductor backend.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastvq import FastVectorQuantizer

from conftest import TOLERANCES, backend_or_skip

FP32 = TOLERANCES[torch.float32]


# ---- opcheck --------------------------------------------------------------------------------
def laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values (N, d) in another memory layout, as a leaf tensor (requires_grad_ works on it).
    The fakes must give outputs with the real ops' strides (contiguous) whatever the inputs' layout."""
    if layout == "transposed":  # dense, but column-major: torch.empty_like would keep these strides
        return values.t().contiguous().t().detach()
    if layout == "offset":  # contiguous rows that start inside a larger storage
        buffer = torch.full((len(values) + 1, values.shape[1]), 7.0, dtype=values.dtype)
        buffer[1:] = values
        return buffer[1:].detach()
    if layout == "expanded":  # one row repeated with stride 0
        return values[:1].expand(values.shape).detach()
    raise ValueError(layout)


LAYOUTS = ("transposed", "offset", "expanded")


def op_samples(backend):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(37, 5, generator=generator)
    codebook = torch.randn(7, 5, generator=generator)
    indices, _ = torch.ops.fastvq.nearest_code(x, codebook, "torch")
    half = x.to(torch.bfloat16)
    non_contiguous = torch.randn(5, 37, generator=generator).t()
    scale, scale_2 = torch.tensor(0.1), torch.tensor(0.2)
    grad_quantized = torch.randn(37, 5, generator=generator)
    # kmeans_init_ and expire_codes_ work on C codebooks: state (C, K[, d]), rows (C, M, d)
    embed = torch.stack([codebook, codebook.flip(0)])
    rows = torch.stack([x, x.flip(0)])
    cluster_size = torch.tensor([[0.5, 2.0, 0.1, 3.0, 3.0, 3.0, 0.2], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 0.9]])
    samples = {
        "nearest_code": (torch.ops.fastvq.nearest_code.default, (x, codebook, backend)),
        "nearest_code_bf16": (torch.ops.fastvq.nearest_code.default, (half, codebook, backend)),
        "nearest_code_strided": (torch.ops.fastvq.nearest_code.default, (non_contiguous, codebook, backend)),
        "quantize_ema": (torch.ops.fastvq.quantize.default,
                         (x.clone().requires_grad_(), codebook, 0.25, 0.0, backend)),
        "quantize_learnable": (torch.ops.fastvq.quantize.default,
                               (x.clone().requires_grad_(), codebook.clone().requires_grad_(), 0.25, 1.0, backend)),
        "quantize_rotation_trick": (torch.ops.fastvq.quantize.default,
                                    (x.clone().requires_grad_(), codebook, 1.0, 0.0, backend, True)),
        "quantize_empty": (torch.ops.fastvq.quantize.default, (torch.empty(0, 5), codebook, 0.25, 0.0, backend)),
        "quantize_backward": (torch.ops.fastvq.quantize_backward.default,
                              (grad_quantized, x, codebook, indices, scale, scale_2, backend, True)),
        "quantize_backward_no_codebook": (torch.ops.fastvq.quantize_backward.default,
                                          (grad_quantized, x, codebook, indices, scale, scale_2, backend, False)),
        "ema_stats": (torch.ops.fastvq.ema_stats.default, (x, indices, 7, backend)),
        "snapshot": (torch.ops.fastvq.snapshot.default, (codebook,)),
        "kmeans_init_": (torch.ops.fastvq.kmeans_init_.default,
                         (torch.zeros(1, 7, 5), torch.ones(1, 7), torch.zeros(1, 7, 5), torch.tensor(False),
                          x.view(1, 37, 5), 3, False, 1e-5, False, backend)),
        "kmeans_init_two_codebooks_spherical": (torch.ops.fastvq.kmeans_init_.default,
                                                (torch.zeros(2, 7, 5), torch.ones(2, 7), torch.zeros(2, 7, 5),
                                                 torch.tensor(False), rows.clone(), 2, True, 1e-5, False, backend)),
        "expire_codes_": (torch.ops.fastvq.expire_codes_.default,
                          (embed.clone(), cluster_size.clone(), embed.clone(), rows.clone(), 1.0, 1.0, False, False)),
    }
    # Strided, storage-offset and stride-0 inputs (issue #12, finding 1): the outputs are contiguous.
    for layout in LAYOUTS:
        indices_, _ = torch.ops.fastvq.nearest_code(laid_out(x, layout), laid_out(codebook, layout), "torch")
        samples |= {
            f"nearest_code_{layout}": (torch.ops.fastvq.nearest_code.default,
                                       (laid_out(x, layout), laid_out(codebook, layout), backend)),
            f"quantize_{layout}": (torch.ops.fastvq.quantize.default,
                                   (laid_out(x, layout).requires_grad_(), laid_out(codebook, layout).requires_grad_(),
                                    0.25, 1.0, backend, True)),
            f"quantize_backward_{layout}": (torch.ops.fastvq.quantize_backward.default,
                                            (laid_out(grad_quantized, layout), laid_out(x, layout),
                                             laid_out(codebook, layout), indices_, scale, scale_2, backend, True,
                                             True)),
            f"ema_stats_{layout}": (torch.ops.fastvq.ema_stats.default, (laid_out(x, layout), indices, 7, backend)),
            f"snapshot_{layout}": (torch.ops.fastvq.snapshot.default, (laid_out(codebook, layout),)),
        }
    return samples


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("case", list(op_samples("torch")))
def test_opcheck(backend, case):
    backend_or_skip(backend, torch.empty(1, 1))
    op, args = op_samples(backend)[case]
    torch.library.opcheck(op, args)


# ---- compiled models ------------------------------------------------------------------------
class AutoEncoder(nn.Module):
    def __init__(self, **vq_kwargs):
        super().__init__()
        self.encoder, self.decoder = nn.Linear(12, 8), nn.Linear(8, 12)
        self.vq = FastVectorQuantizer(8, 16, **vq_kwargs)

    def forward(self, x):
        quantized, indices, vq_loss, stats = self.vq(self.encoder(x), return_stats=True)
        loss = ((self.decoder(quantized) - x) ** 2).mean() + vq_loss
        return loss, indices, stats.perplexity


def run(model, batches, *, train):
    model.train(train)
    outputs = []
    for x in batches:
        loss, indices, perplexity = model(x)
        if train:
            model.zero_grad()
            loss.backward()
            outputs.append([p.grad.clone() for p in model.parameters()])
        outputs.append((loss.detach(), indices, perplexity))
    return outputs


def assert_compiled_matches_eager(vq_kwargs, backend, num_batches=2):
    torch.manual_seed(0)
    eager = AutoEncoder(**vq_kwargs)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend=backend)
    batches = [torch.randn(4, 10, 12, generator=torch.Generator().manual_seed(i)) for i in range(num_batches)]
    for train in (True, False):
        torch.manual_seed(1)
        want = run(eager, batches, train=train)
        torch.manual_seed(1)
        got = run(compiled, batches, train=train)
        torch.testing.assert_close(got, want, **FP32)
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_module.state_dict()[name], value, **FP32, msg=name)
    return compiled_module


@pytest.mark.parametrize("vq_kwargs", [
    # heads split dim = 8 into 2 vectors of 4 (codebook_dim = dim // heads: no projections)
    dict(kmeans_init=True, use_cosine_sim=True, heads=2, codebook_dim=4, separate_codebook_per_head=True),
    dict(ema_update=False, learnable_codebook=True, heads=2, codebook_dim=4, kmeans_init=True),
], ids=["ema-features", "learnable-features"])
def test_fullgraph_aot_eager_matches_eager_in_train_and_eval(vq_kwargs):
    torch._dynamo.reset()
    module = assert_compiled_matches_eager(vq_kwargs, "aot_eager")
    assert bool(module.vq._codebook.initted)


def test_fullgraph_dead_code_revival_compiles():
    torch._dynamo.reset()
    torch.manual_seed(2)
    vq = FastVectorQuantizer(4, 16, threshold_ema_dead_code=1.0, decay=0.9).train()
    vq.set_codebook(torch.randn(16, 4) + 50)
    compiled = torch.compile(vq, fullgraph=True, backend="aot_eager")
    x = torch.randn(64, 4)
    compiled(x)
    revived = vq._codebook.cluster_size[0] == 1.0
    assert int(revived.sum()) == 15
    for row in vq.codebook[revived]:
        assert bool(((x - row).abs().sum(1) == 0).any())


def test_fullgraph_inductor_forward_and_backward():
    torch._dynamo.reset()
    assert_compiled_matches_eager(dict(), "inductor", num_batches=1)
