"""FastVectorQuantizer's training options (issue 5), against fastvq.reference, plain torch and
vector-quantize-pytorch: dead-code revival, usage stats, freezing, learnable codebooks and ema_update,
the kwargs fastvq refuses, and half-precision inputs. (tests/test_module_features.py has drop-in
parity, heads, cosine similarity, k-means init and layouts.)"""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastvq import FastVectorQuantizer, reference

from conftest import TOLERANCES
from module_helpers import ORACLE_SETTINGS, blobs, oracle_state, state_of

FP32 = TOLERANCES[torch.float32]


# ---- dead-code revival ----------------------------------------------------------------------
def test_dead_codes_take_batch_rows_and_the_next_ema_step_keeps_them():
    torch.manual_seed(5)
    threshold, decay = 1.0, 0.9  # an unused code's cluster_size drops from 1 to 0.9: dead
    module = FastVectorQuantizer(4, 16, threshold_ema_dead_code=threshold, decay=decay, **ORACLE_SETTINGS).train()
    module.set_codebook(torch.randn(16, 4) + 50)  # far from the data: only the nearest code is used
    x = blobs(200, 4, seed=8)
    embed, cluster_size, embed_avg = oracle_state(module)
    module(x)
    state = module._codebook
    reference.ema_vq_step(x, embed, cluster_size, embed_avg, decay=decay, eps=1e-5, commitment_weight=0.25)
    dead = cluster_size < threshold
    assert 0 < int(dead.sum()) < 16
    alive = ~dead
    torch.testing.assert_close(state.embed[0][alive], embed[alive], **FP32)
    torch.testing.assert_close(state.cluster_size[0][alive], cluster_size[alive], **FP32)
    revived = state.embed[0][dead]
    for row in revived:  # each revived code is a batch row, no two the same
        assert bool(((x - row).abs().sum(1) == 0).any())
    assert len({tuple(r.tolist()) for r in revived}) == len(revived)
    torch.testing.assert_close(state.cluster_size[0][dead], torch.full((int(dead.sum()),), threshold),
                               rtol=0, atol=0)
    torch.testing.assert_close(state.embed_avg[0][dead], revived * threshold, **FP32)
    # The next EMA step starts from the reset statistics, so revived codes move to their data, not back.
    embed, cluster_size, embed_avg = oracle_state(module)
    module(x)
    reference.ema_vq_step(x, embed, cluster_size, embed_avg, decay=decay, eps=1e-5, commitment_weight=0.25)
    still_alive = cluster_size >= threshold
    torch.testing.assert_close(state.embed[0][still_alive], embed[still_alive], **FP32)
    assert bool((state.embed[0][dead & still_alive].abs() < 20).all())  # near the data, not back at +50


def test_dead_codes_in_a_learnable_codebook_are_replaced_after_the_step():
    # vqp 1.32: a learnable codebook tracks usage and replaces dead codes after the search, as an
    # EMA codebook does (no revival before the search); its live codes learn by gradient only.
    torch.manual_seed(6)
    threshold, decay = 0.6, 0.5
    module = FastVectorQuantizer(4, 8, ema_update=False, learnable_codebook=True, threshold_ema_dead_code=threshold,
                                 decay=decay).train()
    with torch.no_grad():
        module._codebook.embed.copy_(torch.randn(1, 8, 4) + 50)
    embed, cluster_size, embed_avg = oracle_state(module)
    x = blobs(100, 4, seed=9).requires_grad_()
    _, indices, loss = module(x)
    loss.backward()
    want_indices, _ = reference.nearest_code(x.detach(), embed)  # the search saw the codebook before the step
    torch.testing.assert_close(indices, want_indices, rtol=0, atol=0)
    counts, sums = reference.ema_stats(x.detach(), want_indices, 8)
    cluster_size, embed_avg = cluster_size.lerp(counts, 1 - decay), embed_avg.lerp(sums, 1 - decay)
    dead = cluster_size < threshold  # unused: 1 -> 0.5
    assert 0 < int(dead.sum()) < 8
    alive, state = ~dead, module._codebook
    torch.testing.assert_close(state.embed[0][alive].detach(), embed[alive], rtol=0, atol=0)  # no EMA step
    torch.testing.assert_close(state.cluster_size[0][alive], cluster_size[alive], **FP32)
    torch.testing.assert_close(state.embed_avg[0][alive], embed_avg[alive], **FP32)
    revived = state.embed[0][dead].detach()
    for row in revived:  # each replaced code is a batch row, no two the same
        assert bool(((x.detach() - row).abs().sum(1) == 0).any())
    assert len({tuple(r.tolist()) for r in revived}) == len(revived)
    torch.testing.assert_close(state.cluster_size[0][dead], torch.full((int(dead.sum()),), threshold), rtol=0, atol=0)
    torch.testing.assert_close(state.embed_avg[0][dead], revived * threshold, **FP32)
    # The commitment gradient reached the codes the search used, computed at their pre-step values.
    grad = state.embed.grad[0]
    torch.testing.assert_close(grad, torch.zeros_like(grad).index_add_(0, want_indices, -x.grad), **FP32)
    assert bool(grad[counts > 0].abs().sum() > 0)


# ---- stats ----------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("heads,separate", [(1, False), (2, False), (2, True)])
def test_stats_match_a_one_hot_computation(training, heads, separate):
    torch.manual_seed(8)
    module = FastVectorQuantizer(8, 12, heads=heads, separate_codebook_per_head=separate).train(training)
    _, indices, _, stats = module(torch.randn(5, 9, 8), return_stats=True)
    per_codebook = indices.reshape(-1, heads).t() if separate else indices.reshape(1, -1)
    probs = F.one_hot(per_codebook, 12).double().mean(1)  # (codebooks, K), the N×K one-hot: test only
    entropy = -(probs * probs.clamp_min(1e-300).log()).sum(-1)
    torch.testing.assert_close(stats.perplexity.double(), entropy.exp().mean(), **FP32)
    torch.testing.assert_close(stats.utilization.double(), (probs > 0).double().mean(), **FP32)
    assert stats.counts.shape == ((heads, 12) if separate else (12,))


def test_stats_of_an_empty_batch():
    _, _, _, stats = FastVectorQuantizer(4, 8)(torch.empty(0, 4), return_stats=True)
    assert float(stats.perplexity) == 1.0 and float(stats.utilization) == 0.0


# ---- freeze, learnable_codebook, and vector-quantize-pytorch kwargs -------------------------
def test_freeze_codebook_keeps_the_state():
    module = FastVectorQuantizer(4, 8, freeze_codebook=True).train()
    before = state_of(module)
    module(torch.randn(30, 4))
    unfrozen = FastVectorQuantizer(4, 8).train()
    unfrozen.load_state_dict(before)
    unfrozen(torch.randn(30, 4), freeze_codebook=True)
    for name, value in before.items():
        torch.testing.assert_close(module.state_dict()[name], value, rtol=0, atol=0)
        torch.testing.assert_close(unfrozen.state_dict()[name], value, rtol=0, atol=0)


def test_frozen_learnable_codebook_gets_no_gradient_and_eval_loss_is_zero():
    module = FastVectorQuantizer(4, 8, ema_update=False, learnable_codebook=True, commitment_weight=0.25).train()
    x = torch.randn(30, 4)
    _, indices, loss = module(x, freeze_codebook=True)
    mse = ((x - module.codebook.detach()[indices]) ** 2).mean()
    torch.testing.assert_close(loss.detach(), 0.25 * mse, **FP32)
    loss.backward()
    assert module._codebook.embed.grad is None
    _, _, eval_loss = module.eval()(x)  # vqp 1.32: no loss term in eval, learnable or not
    assert eval_loss.dim() == 0 and float(eval_loss) == 0.0


def test_learnable_codebook_and_ema_update_are_vector_quantizes_switches():
    learnable = FastVectorQuantizer(4, 8, ema_update=False, learnable_codebook=True)
    assert learnable.learnable_codebook and not learnable.ema_update
    assert isinstance(learnable._codebook.embed, nn.Parameter)
    assert FastVectorQuantizer(4, 8, learnable_codebook=False).ema_update
    # vqp asserts 'learnable codebook not compatible with EMA update'; ema_update must be turned off.
    with pytest.raises(ValueError, match=r"learnable_codebook=True needs ema_update=False"):
        FastVectorQuantizer(4, 8, learnable_codebook=True)
    # ema_update=False alone: a buffer codebook that neither learns nor updates.
    frozen = FastVectorQuantizer(4, 8, ema_update=False).train()
    assert not frozen.learnable_codebook and not frozen.ema_update and list(frozen.parameters()) == []
    before = state_of(frozen)
    x = torch.randn(30, 4, requires_grad=True)
    quantized, _, loss = frozen(x)
    (quantized.sum() + loss).backward()
    assert x.grad is not None
    for name, value in before.items():
        torch.testing.assert_close(frozen.state_dict()[name], value, rtol=0, atol=0)


# vqp 1.32 arguments fastvq does not implement, each with its default and a value that changes training.
UNIMPLEMENTED = {
    "directional_reparam": (False, True),
    "vq_bridge": (None, nn.Identity()),
    "affine_param": (False, True),
    "sync_affine_param": (False, True),
    "in_place_codebook_optimizer": (None, torch.optim.SGD),
    "sync_update_v": (0.0, 0.5),
}


@pytest.mark.parametrize("name", list(UNIMPLEMENTED))
def test_unimplemented_vector_quantize_kwargs_work_at_defaults_and_fail_loudly_otherwise(name):
    default, other = UNIMPLEMENTED[name]
    FastVectorQuantizer(4, 8, **{name: default})
    with pytest.raises(ValueError, match=rf"does not implement vector-quantize-pytorch's {name}=.*"
                                         rf"only the default {name}={re.escape(repr(default))} is accepted"):
        FastVectorQuantizer(4, 8, **{name: other})


def test_unimplemented_forward_arguments_fail_loudly_and_echo_tensors_by_shape():
    with pytest.raises(TypeError, match="unexpected keyword argument 'not_a_kwarg'"):
        FastVectorQuantizer(4, 8, not_a_kwarg=1)
    module = FastVectorQuantizer(4, 8)
    x = torch.randn(2, 3, 4)
    module(x, topk=None, indices=None, codebook_transform_fn=None)
    with pytest.raises(ValueError, match=r"indices must have shape \(2, 3\), got a tensor of shape \(2, 4\), "
                                         r"dtype torch.int64, on cpu"):
        module(x, indices=torch.zeros(2, 4, dtype=torch.int64))


# ---- mixed precision ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", [dict(), dict(heads=2, codebook_dim=4, separate_codebook_per_head=True)],
                         ids=["plain", "heads"])
def test_half_inputs_compute_in_float32(dtype, config):
    torch.manual_seed(9)
    # Straight-through, whose forward value is the code itself (the rotation trick's is the code up to rounding).
    half = FastVectorQuantizer(8, 16, rotation_trick=False, **config).train()
    full = copy.deepcopy(half)
    x = blobs(64, 8, seed=11).to(dtype).requires_grad_()
    quantized, indices, loss = half(x)
    want_q, want_i, want_loss = full(x.detach().float())  # the same values, upcast exactly
    quantized.float().sum().backward()
    assert quantized.dtype == dtype and x.grad.dtype == dtype and loss.dtype == torch.float32
    torch.testing.assert_close(indices, want_i, rtol=0, atol=0)
    torch.testing.assert_close(quantized, want_q.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(loss, want_loss, **FP32)
    for name, value in full.state_dict().items():  # float32 state (initted is vqp's bool)
        assert half.state_dict()[name].dtype == (torch.bool if name == "_codebook.initted" else torch.float32)
        torch.testing.assert_close(half.state_dict()[name], value, **FP32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_to_a_cosine_codebook_are_normalised_in_their_dtype_then_computed_in_float32(dtype):
    # vqp 1.32 l2-normalises the input in its own dtype (transform_input) before the codebook's
    # float32 upcast; search, loss and EMA statistics then run in float32 on those unit rows.
    torch.manual_seed(9)
    module = FastVectorQuantizer(8, 16, use_cosine_sim=True, decay=0.8, **ORACLE_SETTINGS).train()
    embed, cluster_size, embed_avg = oracle_state(module)
    x = blobs(64, 8, seed=11).to(dtype).requires_grad_()
    quantized, indices, loss = module(x)
    quantized.float().sum().backward()
    assert quantized.dtype == dtype and x.grad.dtype == dtype and loss.dtype == torch.float32
    unit = F.normalize(x.detach(), dim=-1, eps=1e-6).float()
    want_indices = (unit @ embed.t()).argmax(-1)
    torch.testing.assert_close(indices, want_indices, rtol=0, atol=0)
    torch.testing.assert_close(quantized, embed[want_indices].to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(loss, 0.25 * ((unit - embed[want_indices]) ** 2).mean(), **FP32)
    counts, sums = reference.ema_stats(unit, want_indices, 16)
    reference.ema_update(embed, cluster_size, embed_avg, counts, sums, 0.8, 1e-5)
    state = module._codebook
    assert state.embed.dtype == state.embed_avg.dtype == state.cluster_size.dtype == torch.float32
    torch.testing.assert_close(state.cluster_size[0], cluster_size, **FP32)
    torch.testing.assert_close(state.embed_avg[0], embed_avg, **FP32)
    torch.testing.assert_close(module.codebook, F.normalize(embed, dim=-1), **FP32)


def test_under_autocast_a_linear_feeds_bfloat16_and_the_state_stays_float32():
    torch.manual_seed(10)
    encoder = torch.nn.Linear(6, 8)
    module = FastVectorQuantizer(8, 16, use_cosine_sim=True, heads=2, codebook_dim=4).train()
    x = torch.randn(32, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = encoder(x)
        quantized, _, loss = module(hidden)
    assert hidden.dtype == torch.bfloat16 and quantized.dtype == torch.bfloat16
    (quantized.float().sum() + loss).backward()
    assert encoder.weight.grad is not None and bool(torch.isfinite(encoder.weight.grad).all())
    assert module.codebook.dtype == torch.float32 and bool(torch.isfinite(module.codebook).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_no_nan_or_negative_loss_when_inputs_are_codes_with_large_norms(dtype):
    codebook = (torch.randn(16, 32) * 100 + 200).to(dtype).float()  # representable in dtype
    module = FastVectorQuantizer(32, 16).train()
    module.set_codebook(codebook)
    x = codebook[torch.arange(64) % 16].to(dtype)
    quantized, indices, loss = module(x)
    assert float(loss.detach()) == 0.0
    torch.testing.assert_close(indices, torch.arange(64) % 16, rtol=0, atol=0)
    assert bool(torch.isfinite(module.codebook).all())
