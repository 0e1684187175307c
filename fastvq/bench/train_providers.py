"""Training-step providers: one step of an EMA vector quantizer in train mode.

A step is forward (search + quantize + commitment loss), backward of
(quantized, loss) with a fixed upstream gradient, and the EMA codebook update.
Both quantizers use the same config (decay 0.99, commitment weight 0.25, eps 1e-5)
and start from the same codebook; the codebook then evolves step by step in each.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .providers import Check, Provider, Runner, fastvq_backend_reason, fastvq_backends, import_reason
from .search_providers import Sgemm
from .verify import Oracle, judge
from .workloads import CaseData

DECAY = 0.99
COMMITMENT_WEIGHT = 0.25
EPS = 1e-5


class TrainRunner(Runner):
    """Subclasses set ``self.module`` and implement ``codebook()`` (the current (K, d) codebook)."""

    module: torch.nn.Module

    def __init__(self, data: CaseData):
        self.x = data.x.clone().requires_grad_(True)  # a leaf, like an encoder's output
        self.grad_out = data.grad_out
        self.one = torch.ones(())

    def codebook(self) -> Tensor:
        raise NotImplementedError

    def step(self) -> tuple[Tensor, Tensor, Tensor]:
        self.x.grad = None
        quantized, indices, loss = self.module(self.x)
        torch.autograd.backward([quantized, loss], [self.grad_out, self.one.to(loss.dtype)])
        return quantized, indices, loss

    def __call__(self) -> None:
        self.step()

    def checked_run(self, rows: Tensor, oracle: Oracle) -> Check:
        before = self.codebook().detach().clone()
        quantized, indices, loss = self.step()
        verdict = judge(self.x, before, indices.reshape(-1), rows, oracle)
        if not verdict.message:
            verdict.message = _check_step(self.x, quantized, before, indices.reshape(-1), loss, rows)
        return Check(verdict, {"loss": float(loss.detach())})


def _check_step(x: Tensor, quantized: Tensor, codebook: Tensor, indices: Tensor, loss: Tensor, rows: Tensor) -> str:
    """'' if the forward values (quantized ≈ codebook[indices], the loss) and x.grad look right."""
    codes = codebook[indices[rows]]
    got = quantized.detach().reshape(-1, x.shape[1])[rows]
    # Straight-through outputs are x + (e − x).detach(), equal to e up to one rounding.
    if not torch.allclose(got, codes, rtol=1e-5, atol=1e-5 * float(codes.abs().max().clamp_min(1.0))):
        return "quantized is not codebook[indices] on the checked rows"
    expected_loss = COMMITMENT_WEIGHT * float(((x.detach() - codebook[indices]) ** 2).double().mean())
    if abs(float(loss.detach()) - expected_loss) > 1e-4 * max(abs(expected_loss), 1e-12):
        return f"loss {float(loss):.6g} != commitment_weight·mean((x − e_idx)²) = {expected_loss:.6g}"
    if x.grad is None or x.grad.shape != x.shape or not torch.isfinite(x.grad).all():
        return "x.grad is missing, misshapen or non-finite after backward"
    return ""


class _Fastvq(TrainRunner):
    def __init__(self, data: CaseData, backend: str):
        super().__init__(data)
        from ..modules import FastVectorQuantizer

        self.module = FastVectorQuantizer(
            data.x.shape[1], data.codebook.shape[0], decay=DECAY, eps=EPS,
            commitment_weight=COMMITMENT_WEIGHT, ema_update=True, backend=backend,
        )
        self.module.set_codebook(data.codebook)
        self.module.train()

    def codebook(self):
        return self.module.embed


class FastvqTrain(Provider):
    workload, role = "train", "fastvq"

    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"fastvq-{backend}"
        self.description = (f"fastvq.FastVectorQuantizer(dim, K, decay={DECAY}, commitment_weight={COMMITMENT_WEIGHT}, "
                            f"backend={backend!r}), train mode, EMA")
        self.opt_in = backend == "torch"

    def absent_reason(self, case, data):
        return fastvq_backend_reason(self.backend, data.x, data.codebook)

    def prepare(self, case, data):
        return _Fastvq(data, self.backend)


class _VectorQuantize(TrainRunner):
    def __init__(self, data: CaseData):
        super().__init__(data)
        from vector_quantize_pytorch import VectorQuantize

        self.module = VectorQuantize(
            data.x.shape[1], data.codebook.shape[0], decay=DECAY, eps=EPS,
            commitment_weight=COMMITMENT_WEIGHT, rotation_trick=False,
        )
        state = self.module._codebook  # the same start as FastVectorQuantizer.set_codebook
        with torch.no_grad():
            state.embed.copy_(data.codebook.reshape(state.embed.shape))
            state.embed_avg.copy_(data.codebook.reshape(state.embed_avg.shape))
            state.cluster_size.fill_(1.0)
        self.module.train()

    def codebook(self):
        embed = self.module._codebook.embed
        return embed.reshape(embed.shape[-2], embed.shape[-1])


class VectorQuantizePytorch(Provider):
    name, workload = "vqtorch", "train"
    description = (f"vector_quantize_pytorch.VectorQuantize(dim, K, decay={DECAY}, "
                   f"commitment_weight={COMMITMENT_WEIGHT}, rotation_trick=False), train mode, EMA")

    def absent_reason(self, case, data):
        return import_reason("vector_quantize_pytorch")

    def prepare(self, case, data):
        return _VectorQuantize(data)


def providers() -> list[Provider]:
    return [Sgemm("train"), VectorQuantizePytorch()] + [FastvqTrain(b) for b in fastvq_backends()]
