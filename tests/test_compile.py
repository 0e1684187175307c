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
def op_samples(backend):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(37, 5, generator=generator)
    codebook = torch.randn(7, 5, generator=generator)
    indices, _ = torch.ops.fastvq.nearest_code(x, codebook, "torch")
    half = x.to(torch.bfloat16)
    non_contiguous = torch.randn(5, 37, generator=generator).t()
    scale, scale_2 = torch.tensor(0.1), torch.tensor(0.2)
    return {
        "nearest_code": (torch.ops.fastvq.nearest_code.default, (x, codebook, backend)),
        "nearest_code_bf16": (torch.ops.fastvq.nearest_code.default, (half, codebook, backend)),
        "nearest_code_strided": (torch.ops.fastvq.nearest_code.default, (non_contiguous, codebook, backend)),
        "quantize_ema": (torch.ops.fastvq.quantize.default,
                         (x.clone().requires_grad_(), codebook, 0.25, 0.0, backend)),
        "quantize_learnable": (torch.ops.fastvq.quantize.default,
                               (x.clone().requires_grad_(), codebook.clone().requires_grad_(), 0.25, 1.0, backend)),
        "quantize_empty": (torch.ops.fastvq.quantize.default, (torch.empty(0, 5), codebook, 0.25, 0.0, backend)),
        "quantize_backward": (torch.ops.fastvq.quantize_backward.default,
                              (torch.randn(37, 5, generator=generator), x, codebook, indices, scale, scale_2, backend,
                               True)),
        "quantize_backward_no_codebook": (torch.ops.fastvq.quantize_backward.default,
                                          (torch.randn(37, 5, generator=generator), x, codebook, indices, scale,
                                           scale_2, backend, False)),
        "ema_stats": (torch.ops.fastvq.ema_stats.default, (x, indices, 7, backend)),
        "snapshot": (torch.ops.fastvq.snapshot.default, (codebook,)),
        "kmeans_init_": (torch.ops.fastvq.kmeans_init_.default,
                         (codebook.clone(), torch.ones(7), codebook.clone(), torch.tensor(False), x.view(37, 1, 5), 3,
                          False, False, backend)),
    }


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
    dict(kmeans_init=True, use_cosine_sim=True, heads=2, separate_codebook_per_head=True),
    dict(ema_update=False, heads=2, kmeans_init=True),
], ids=["ema-features", "learnable-features"])
def test_fullgraph_aot_eager_matches_eager_in_train_and_eval(vq_kwargs):
    torch._dynamo.reset()
    module = assert_compiled_matches_eager(vq_kwargs, "aot_eager")
    assert bool(module.vq.initted)


def test_fullgraph_dead_code_revival_compiles():
    torch._dynamo.reset()
    torch.manual_seed(2)
    vq = FastVectorQuantizer(4, 16, threshold_ema_dead_code=1.0, decay=0.9).train()
    vq.set_codebook(torch.randn(16, 4) + 50)
    compiled = torch.compile(vq, fullgraph=True, backend="aot_eager")
    x = torch.randn(64, 4)
    compiled(x)
    revived = vq.cluster_size == 1.0
    assert int(revived.sum()) == 15
    for row in vq.embed[revived]:
        assert bool(((x - row).abs().sum(1) == 0).any())


def test_fullgraph_inductor_forward_and_backward():
    torch._dynamo.reset()
    assert_compiled_matches_eager(dict(), "inductor", num_batches=1)
