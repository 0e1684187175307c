"""FastVectorQuantizer's training features (issue 5), against fastvq.reference, plain torch and
vector-quantize-pytorch."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastvq
from fastvq import FastVectorQuantizer, reference
from fastvq.nn.layout import ChannelLayout

from conftest import TOLERANCES

FP32 = TOLERANCES[torch.float32]


def blobs(num_rows, dim, num_centres=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(num_centres, dim, generator=generator)
    labels = torch.randint(0, num_centres, (num_rows,), generator=generator)
    return centres[labels] + 0.3 * torch.randn(num_rows, dim, generator=generator)


def state_of(module):
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


# ---- drop-in: the same numbers as vector-quantize-pytorch ---------------------------------------
DROP_IN_CONFIGS = [
    dict(),
    dict(heads=2, codebook_dim=4),
    dict(heads=2, codebook_dim=4, separate_codebook_per_head=True),
    dict(use_cosine_sim=True),
    dict(accept_image_fmap=True),
    dict(channel_last=False),
]


@pytest.mark.parametrize("config", DROP_IN_CONFIGS, ids=lambda c: ",".join(c) or "default")
def test_matches_vector_quantize_pytorch_step_for_step(config):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    shared = dict(decay=0.8, commitment_weight=1.0, rotation_trick=False, **config)
    ours = FastVectorQuantizer(8, 16, **shared).train()
    theirs = vqp.VectorQuantize(8, 16, **shared).train()
    num_codebooks = ours.num_codebooks
    theirs._codebook.embed.copy_(ours.embed.view(num_codebooks, 16, -1))
    theirs._codebook.embed_avg.copy_(ours.embed_avg.view(num_codebooks, 16, -1))
    shape = (2, 8, 3, 5) if config.get("accept_image_fmap") else (3, 8, 10) if "channel_last" in config else (3, 10, 8)
    for step in range(3):
        x = 2 * torch.randn(shape, generator=torch.Generator().manual_seed(step))
        x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        q_ours, i_ours, loss_ours = ours(x_ours)
        q_theirs, i_theirs, loss_theirs = theirs(x_theirs)
        (q_ours.square().sum() + loss_ours).backward()
        (q_theirs.square().sum() + loss_theirs).backward()
        torch.testing.assert_close(i_ours, i_theirs, rtol=0, atol=0)
        torch.testing.assert_close(q_ours, q_theirs, **FP32)
        torch.testing.assert_close(loss_ours, loss_theirs, **FP32)
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, **FP32)
        torch.testing.assert_close(ours.embed.view(num_codebooks, 16, -1), theirs._codebook.embed, **FP32)
        torch.testing.assert_close(ours.cluster_size.view(num_codebooks, 16), theirs._codebook.cluster_size, **FP32)
    want_codes = theirs.get_codes_from_indices(i_theirs)
    if config.get("heads") and not config.get("separate_codebook_per_head"):
        want_codes = want_codes.flatten(-2)  # VectorQuantize leaves a shared codebook's heads unmerged
    torch.testing.assert_close(ours.get_codes_from_indices(i_ours), want_codes, **FP32)


# ---- heads ----------------------------------------------------------------------------------
@pytest.mark.parametrize("separate", [False, True])
def test_heads_match_the_reference_step(separate):
    torch.manual_seed(1)
    heads, dim, size = 3, 12, 9
    module = FastVectorQuantizer(dim, size, heads=heads, separate_codebook_per_head=separate, decay=0.7).train()
    codebooks = module.embed.clone().view(-1, size, 4)
    states = [[codebooks[c].clone(), torch.ones(size), codebooks[c].clone()] for c in range(len(codebooks))]
    for step in range(3):
        x = blobs(2 * 7, dim, seed=step).view(2, 7, dim).requires_grad_()
        quantized, indices, loss = module(x)
        assert indices.shape == (2, 7, heads)
        vectors = x.detach().reshape(-1, heads, 4)
        if separate:
            outs = [reference.ema_vq_step(vectors[:, h], *states[h], decay=0.7, eps=1e-5, commitment_weight=0.25)
                    for h in range(heads)]
            want_q = torch.stack([o[0] for o in outs], 1)
            want_i = torch.stack([o[1] for o in outs], 1)
            want_loss = torch.stack([o[2] for o in outs]).mean()
        else:
            want_q, want_i, want_loss = reference.ema_vq_step(vectors.reshape(-1, 4), *states[0], decay=0.7,
                                                              eps=1e-5, commitment_weight=0.25)
        torch.testing.assert_close(indices.reshape(-1), want_i.reshape(-1), rtol=0, atol=0)
        torch.testing.assert_close(quantized.detach(), want_q.reshape(x.shape), **FP32)
        torch.testing.assert_close(loss, want_loss, **FP32)
        torch.testing.assert_close(module.embed.view(-1, size, 4), torch.stack([s[0] for s in states]), **FP32)
    eval_quantized, eval_indices, _ = module.eval()(x.detach())
    torch.testing.assert_close(module.get_codes_from_indices(eval_indices), eval_quantized, rtol=0, atol=0)


def test_heads_must_divide_dim():
    with pytest.raises(ValueError, match="dim must be divisible by heads, got dim=10, heads=3"):
        FastVectorQuantizer(10, 8, heads=3)
    with pytest.raises(ValueError, match="codebook_dim must be None or dim // heads == 5"):
        FastVectorQuantizer(10, 8, heads=2, codebook_dim=10)


# ---- cosine similarity ----------------------------------------------------------------------
def test_cosine_matches_plain_torch_and_codes_stay_unit_norm():
    torch.manual_seed(2)
    module = FastVectorQuantizer(6, 11, use_cosine_sim=True, decay=0.6).train()
    embed, cluster_size, embed_avg = module.embed.clone(), module.cluster_size.clone(), module.embed_avg.clone()
    torch.testing.assert_close(embed.norm(dim=-1), torch.ones(11), **FP32)
    for step in range(4):
        x = (blobs(60, 6, seed=10 + step) * 5).requires_grad_()
        quantized, indices, loss = module(x)
        quantized.sum().backward()
        # plain torch: unit inputs, maximum inner product, EMA on unit inputs, renormalise
        unit = F.normalize(x.detach(), dim=-1)
        want_indices = (unit @ embed.t()).argmax(-1)
        torch.testing.assert_close(indices, want_indices, rtol=0, atol=0)
        torch.testing.assert_close(quantized.detach(), embed[want_indices], **FP32)
        torch.testing.assert_close(loss, 0.25 * ((unit - embed[want_indices]) ** 2).mean(), **FP32)
        x_leaf = x.detach().requires_grad_()
        F.normalize(x_leaf, dim=-1).sum().backward()  # straight through the normalisation
        torch.testing.assert_close(x.grad, x_leaf.grad, **FP32)
        counts, sums = reference.ema_stats(unit, want_indices, 11)
        reference.ema_update(embed, cluster_size, embed_avg, counts, sums, 0.6, 1e-5)
        embed = F.normalize(embed, dim=-1)
        torch.testing.assert_close(module.embed, embed, **FP32)
        torch.testing.assert_close(module.embed.norm(dim=-1), torch.ones(11), **FP32)


def test_learnable_cosine_codebook_learns_through_the_normalisation():
    module = FastVectorQuantizer(4, 8, use_cosine_sim=True, ema_update=False)
    x = torch.randn(40, 4)
    _, indices, loss = module(x)
    loss.backward()
    param = module.embed.detach().clone().requires_grad_()
    unit_codes = F.normalize(param, dim=-1)
    want = reference.vq_loss(F.normalize(x, dim=-1), unit_codes[indices], 0.25, 1.0)
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), **FP32)
    torch.testing.assert_close(module.embed.grad, param.grad, **FP32)


# ---- k-means init ---------------------------------------------------------------------------
def test_kmeans_init_sets_the_codebook_from_the_first_training_batch():
    torch.manual_seed(3)
    x = blobs(600, 5, num_centres=8, seed=3)
    module = FastVectorQuantizer(5, 8, kmeans_init=True, kmeans_iters=10, decay=1.0).train()
    module.eval()(x)  # eval never initialises
    assert not bool(module.initted)
    module.train()(x)
    assert bool(module.initted)
    # decay=1 keeps the EMA from moving the init: embed = embed_avg / cluster_size, counts of the batch
    assert float(module.cluster_size.sum()) == 600
    torch.testing.assert_close(module.embed_avg, module.embed * module.cluster_size[:, None], **FP32)
    centroids, _ = fastvq.kmeans(x, 8, iters=10)
    inertia = lambda c: float(reference.nearest_code(x, c)[1].sum())  # noqa: E731
    assert inertia(module.embed) <= 1.02 * inertia(centroids)
    assert inertia(module.embed) < 0.1 * inertia(torch.randn(8, 5))


def test_kmeans_init_runs_once_and_survives_state_dict():
    torch.manual_seed(4)
    module = FastVectorQuantizer(4, 6, kmeans_init=True, decay=0.5).train()
    module(torch.empty(0, 4))  # an empty batch does not count as the first batch
    assert not bool(module.initted)
    module(blobs(100, 4, seed=4))
    after_init = state_of(module)
    batch = blobs(100, 4, seed=5)
    module(batch)  # an EMA step, not a second init
    embed, cluster_size, embed_avg = (after_init[k].clone() for k in ("embed", "cluster_size", "embed_avg"))
    reference.ema_vq_step(batch, embed, cluster_size, embed_avg, decay=0.5, eps=1e-5, commitment_weight=0.25)
    torch.testing.assert_close(module.embed, embed, **FP32)
    fresh = FastVectorQuantizer(4, 6, kmeans_init=True, decay=0.5).train()
    fresh.load_state_dict(after_init)
    fresh(batch)  # loaded as initialised: no k-means on this batch
    torch.testing.assert_close(fresh.embed, embed, **FP32)
    settable = FastVectorQuantizer(4, 6, kmeans_init=True).train()
    settable.set_codebook(embed)
    settable(batch)
    assert bool(settable.initted)


def test_kmeans_init_per_head_codebook_fits_its_own_head():
    x = torch.cat([blobs(300, 3, seed=6) + 20, blobs(300, 3, seed=7) - 20], dim=1)  # head 0 near +20, head 1 near -20
    module = FastVectorQuantizer(6, 4, heads=2, separate_codebook_per_head=True, kmeans_init=True).train()
    module(x)
    assert bool((module.embed[0] > 10).all()) and bool((module.embed[1] < -10).all())


# ---- dead-code revival ----------------------------------------------------------------------
def test_dead_codes_take_batch_rows_and_the_next_ema_step_keeps_them():
    torch.manual_seed(5)
    threshold, decay = 1.0, 0.9  # an unused code's cluster_size drops from 1 to 0.9: dead
    module = FastVectorQuantizer(4, 16, threshold_ema_dead_code=threshold, decay=decay).train()
    module.set_codebook(torch.randn(16, 4) + 50)  # far from the data: only the nearest code is used
    x = blobs(200, 4, seed=8)
    before = state_of(module)
    module(x)
    embed, cluster_size, embed_avg = (before[k].clone() for k in ("embed", "cluster_size", "embed_avg"))
    reference.ema_vq_step(x, embed, cluster_size, embed_avg, decay=decay, eps=1e-5, commitment_weight=0.25)
    dead = cluster_size < threshold
    assert 0 < int(dead.sum()) < 16
    alive = ~dead
    torch.testing.assert_close(module.embed[alive], embed[alive], **FP32)
    torch.testing.assert_close(module.cluster_size[alive], cluster_size[alive], **FP32)
    revived = module.embed[dead]
    for row in revived:  # each revived code is a batch row, no two the same
        assert bool(((x - row).abs().sum(1) == 0).any())
    assert len({tuple(r.tolist()) for r in revived}) == len(revived)
    torch.testing.assert_close(module.cluster_size[dead], torch.full((int(dead.sum()),), threshold), rtol=0, atol=0)
    torch.testing.assert_close(module.embed_avg[dead], revived * threshold, **FP32)
    # The next EMA step starts from the reset statistics, so revived codes move to their data, not back.
    state = state_of(module)
    module(x)
    embed, cluster_size, embed_avg = (state[k].clone() for k in ("embed", "cluster_size", "embed_avg"))
    reference.ema_vq_step(x, embed, cluster_size, embed_avg, decay=decay, eps=1e-5, commitment_weight=0.25)
    still_alive = cluster_size >= threshold
    torch.testing.assert_close(module.embed[still_alive], embed[still_alive], **FP32)
    assert bool((module.embed[dead & still_alive].abs() < 20).all())  # near the data, not back at +50


def test_dead_codes_in_a_learnable_codebook_are_revived_before_the_search():
    torch.manual_seed(6)
    module = FastVectorQuantizer(4, 8, ema_update=False, threshold_ema_dead_code=0.6, decay=0.5).train()
    with torch.no_grad():
        module.embed.copy_(torch.randn(8, 4) + 50)
    x = blobs(100, 4, seed=9)
    module(x)  # step 1: usage tracked (cluster_size 1 -> 0.5 + 0.5 n)
    unused = module.cluster_size < 0.6
    assert bool(unused.any())
    _, indices, loss = module(x)  # step 2: unused codes become batch rows, then the search
    loss.backward()
    for row in module.embed.detach()[unused]:
        assert bool(((x - row).abs().sum(1) == 0).any())
    assert module.embed.grad is not None


# ---- image maps and channel-first layouts ---------------------------------------------------
@pytest.mark.parametrize("kwargs,shape", [(dict(accept_image_fmap=True), (2, 6, 5, 3)),
                                          (dict(accept_3d_fmap=True), (2, 6, 2, 3, 2)),
                                          (dict(channel_last=False), (3, 6, 7))])
def test_channel_first_layouts_equal_channel_last_on_moved_input(kwargs, shape):
    torch.manual_seed(7)
    first = FastVectorQuantizer(6, 10, **kwargs).train()
    last = copy.deepcopy(first)
    last.layout = ChannelLayout()
    x = torch.randn(shape)
    quantized, indices, loss = first(x)
    want_q, want_i, want_loss = last(x.movedim(1, -1))
    assert quantized.shape == x.shape and indices.shape == (shape[0], *shape[2:])
    torch.testing.assert_close(quantized, want_q.movedim(-1, 1), rtol=0, atol=0)
    torch.testing.assert_close(indices, want_i, rtol=0, atol=0)
    torch.testing.assert_close(first.embed, last.embed, rtol=0, atol=0)
    eval_quantized, eval_indices, _ = first.eval()(x)
    torch.testing.assert_close(first.get_codes_from_indices(eval_indices), eval_quantized, rtol=0, atol=0)


def test_image_fmap_rejects_other_ranks():
    with pytest.raises(ValueError, match=r"x must have shape \(B, dim, H, W\) with dim == 6, got \(2, 6, 5\)"):
        FastVectorQuantizer(6, 10, accept_image_fmap=True)(torch.randn(2, 6, 5))


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


def test_frozen_learnable_codebook_gets_no_gradient_and_eval_keeps_the_codebook_term():
    module = FastVectorQuantizer(4, 8, ema_update=False).train()
    x = torch.randn(30, 4)
    _, indices, loss = module(x, freeze_codebook=True)
    mse = ((x - module.embed.detach()[indices]) ** 2).mean()
    torch.testing.assert_close(loss.detach(), 0.25 * mse, **FP32)
    loss.backward()
    assert module.embed.grad is None
    _, _, eval_loss = module.eval()(x)
    torch.testing.assert_close(eval_loss.detach(), 1.25 * mse, **FP32)


def test_learnable_codebook_kwarg_agrees_with_ema_update():
    assert FastVectorQuantizer(4, 8, ema_update=False, learnable_codebook=True).learnable_codebook
    assert FastVectorQuantizer(4, 8, learnable_codebook=False).ema_update
    with pytest.raises(ValueError, match="learnable_codebook=True conflicts with ema_update=True"):
        FastVectorQuantizer(4, 8, learnable_codebook=True)
    with pytest.raises(ValueError, match="learnable_codebook=False conflicts with ema_update=False"):
        FastVectorQuantizer(4, 8, ema_update=False, learnable_codebook=False)


def test_unimplemented_vector_quantize_kwargs_work_at_defaults_and_fail_loudly_otherwise():
    FastVectorQuantizer(4, 8, orthogonal_reg_weight=0.0, stochastic_sample_codes=False, vq_bridge=None,
                        rotation_trick=None, sync_update_v=0.0)
    with pytest.raises(ValueError, match="orthogonal_reg_weight=0.1"):
        FastVectorQuantizer(4, 8, orthogonal_reg_weight=0.1)
    with pytest.raises(ValueError, match="rotation_trick=True"):
        FastVectorQuantizer(4, 8, rotation_trick=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'not_a_kwarg'"):
        FastVectorQuantizer(4, 8, not_a_kwarg=1)
    module = FastVectorQuantizer(4, 8)
    module(torch.randn(3, 4), mask=None)
    with pytest.raises(ValueError, match="mask="):
        module(torch.randn(2, 3, 4), mask=torch.ones(2, 3, dtype=torch.bool))


# ---- mixed precision ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", [dict(), dict(use_cosine_sim=True), dict(heads=2, separate_codebook_per_head=True)],
                         ids=["plain", "cosine", "heads"])
def test_half_inputs_compute_in_float32(dtype, config):
    torch.manual_seed(9)
    half = FastVectorQuantizer(8, 16, **config).train()
    full = copy.deepcopy(half)
    x = blobs(64, 8, seed=11).to(dtype).requires_grad_()
    quantized, indices, loss = half(x)
    want_q, want_i, want_loss = full(x.detach().float())  # the same values, upcast exactly
    quantized.float().sum().backward()
    assert quantized.dtype == dtype and x.grad.dtype == dtype and loss.dtype == torch.float32
    torch.testing.assert_close(indices, want_i, rtol=0, atol=0)
    torch.testing.assert_close(quantized, want_q.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(loss, want_loss, **FP32)
    for name, value in full.state_dict().items():
        assert half.state_dict()[name].dtype == torch.float32
        torch.testing.assert_close(half.state_dict()[name], value, **FP32)


def test_under_autocast_a_linear_feeds_bfloat16_and_the_state_stays_float32():
    torch.manual_seed(10)
    encoder, module = torch.nn.Linear(6, 8), FastVectorQuantizer(8, 16, use_cosine_sim=True, heads=2).train()
    x = torch.randn(32, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = encoder(x)
        quantized, _, loss = module(hidden)
    assert hidden.dtype == torch.bfloat16 and quantized.dtype == torch.bfloat16
    (quantized.float().sum() + loss).backward()
    assert encoder.weight.grad is not None and bool(torch.isfinite(encoder.weight.grad).all())
    assert module.embed.dtype == torch.float32 and bool(torch.isfinite(module.embed).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_no_nan_or_negative_loss_when_inputs_are_codes_with_large_norms(dtype):
    codebook = (torch.randn(16, 32) * 100 + 200).to(dtype).float()  # representable in dtype
    module = FastVectorQuantizer(32, 16).train()
    module.set_codebook(codebook)
    x = codebook[torch.arange(64) % 16].to(dtype)
    quantized, indices, loss = module(x)
    assert float(loss) == 0.0
    torch.testing.assert_close(indices, torch.arange(64) % 16, rtol=0, atol=0)
    assert bool(torch.isfinite(module.embed).all())
