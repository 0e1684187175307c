"""FastVectorQuantizer against vqp 1.32's VectorQuantize, side by side, for forward's extras:
``indices=`` (vqp's codebook-space quantized and the cross-entropy of the given codes),
``codebook_transform_fn``, and the streamed softmax terms against their dense definitions.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES
from test_parity_vector_quantize import CODES, DIM, STEPS, SideBySide, backend  # noqa: F401  (fixture)

from fastvq.nn import softmax_losses
from fastvq.nn.softmax_losses import GumbelStraightThrough, code_logits
from fastvq.nn.softmax_losses import softmax_losses as streamed

pytest.importorskip("vector_quantize_pytorch")

# (constructor kwargs, input shape, shape of the given indices)
INDEX_CONFIGS = {
    "defaults": (dict(), (2, 12, DIM), (2, 12)),
    "cosine": (dict(use_cosine_sim=True), (2, 12, DIM), (2, 12)),
    "heads_separate": (dict(heads=2, separate_codebook_per_head=True, codebook_dim=4), (2, 12, DIM), (2, 12, 2)),
    "heads_shared": (dict(heads=2), (2, 12, DIM), (2, 12, 2)),
    "learnable": (dict(ema_update=False, learnable_codebook=True), (2, 12, DIM), (2, 12)),
    "image_fmap": (dict(accept_image_fmap=True), (2, DIM, 3, 4), (2, 12)),
    "one_token": (dict(), (5, DIM), (5, 1)),
}


def _run_side_by_side(pair: SideBySide, x: torch.Tensor, step: int, call):
    """Calls call(module, input) -> (tensor, loss) on each module with one seed, compares both
    outputs, then the gradients of a random functional of both and every buffer."""
    inputs = [x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()]
    outputs = []
    for module, inp in zip(pair.modules(), inputs):
        module.zero_grad(set_to_none=True)
        torch.manual_seed(1000 + step)
        outputs.append(call(module, inp))
    (q_ref, l_ref), (q_fast, l_fast), (q_exact, l_exact) = outputs
    pair.assert_close(q_fast.detach(), q_ref.detach(), q_exact.detach(), f"step {step} quantized")
    pair.assert_close(l_fast.detach(), l_ref.detach(), l_exact.detach(), f"step {step} loss")
    upstream = torch.randn(q_ref.shape, generator=torch.Generator().manual_seed(step))
    for q, loss in outputs:
        total = (q * upstream.to(q.dtype)).sum() + loss
        if total.requires_grad:
            total.backward()
    pair.assert_close(inputs[1].grad, inputs[0].grad, inputs[2].grad, f"step {step} input grad")
    for name, param in pair.reference.named_parameters():
        fast = dict(pair.fast.named_parameters())[name]
        assert (param.grad is None) == (fast.grad is None), name
        if param.grad is not None:
            exact = dict(pair.exact.named_parameters())[name]
            pair.assert_close(fast.grad, param.grad, exact.grad, f"step {step} grad of {name}")
    pair.compare_state(f"step {step}")


@pytest.mark.parametrize("name", list(INDEX_CONFIGS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_with_indices_matches_vector_quantize(name, mode, backend):
    kwargs, shape, index_shape = INDEX_CONFIGS[name]
    pair = SideBySide.build(kwargs, backend)
    pair.train(mode == "train")
    for step in range(STEPS):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(step))
        given = torch.randint(-1, CODES, index_shape, generator=torch.Generator().manual_seed(40 + step))
        _run_side_by_side(pair, x, step, lambda module, inp, given=given: module(inp, indices=given))


def test_forward_with_indices_checks_them():
    pair = SideBySide.build(dict(), "torch")
    x = torch.randn(2, 12, DIM)
    with pytest.raises(ValueError, match=r"indices must have shape \(2, 12\), got a tensor of shape \(2, 11\)"):
        pair.fast(x, indices=torch.zeros(2, 11, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"indices must lie in \[-1, codebook_size\) = \[-1, 16\)"):
        pair.fast(x, indices=torch.full((2, 12), 16))
    with pytest.raises(TypeError, match=r"indices must be an int64 or int32 tensor, got a tensor of shape"):
        pair.fast(x, indices=torch.zeros(2, 12))


def _transform(shape_bn: tuple[int, int], seed: int):
    """A codebook transform of vqp's contract: (h, K, d) -> (h, b, n, K, d), one affine map per row."""
    generator = torch.Generator().manual_seed(seed)
    scale = 1 + 0.3 * torch.randn(1, *shape_bn, 1, DIM, generator=generator)
    shift = 0.2 * torch.randn(1, *shape_bn, 1, DIM, generator=generator)
    return lambda embed: embed[:, None, None] * scale.to(embed.dtype) + shift.to(embed.dtype)


@pytest.mark.parametrize("kwargs", [dict(), dict(use_cosine_sim=True), dict(ema_update=False, learnable_codebook=True),
                                    dict(rotation_trick=False, commitment_use_cross_entropy_loss=True,
                                         codebook_diversity_loss_weight=0.3),
                                    dict(straight_through=True, rotation_trick=False, route_gradients_to_input=False),
                                    dict(threshold_ema_dead_code=2),
                                    dict(stochastic_sample_codes=True, sample_codebook_temp=0.7)],
                         ids=["defaults", "cosine", "learnable", "softmax_losses", "gumbel_straight_through",
                              "dead_codes", "stochastic_with_vqps_own_noise"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_codebook_transform_fn_matches_vector_quantize(kwargs, mode, backend):
    pair = SideBySide.build(kwargs, backend)
    pair.train(mode == "train")
    for step in range(STEPS):
        x = torch.randn(2, 12, DIM, generator=torch.Generator().manual_seed(step))
        pair.step(x, step, dict(codebook_transform_fn=_transform((2, 12), step)))


def test_codebook_transform_fn_of_the_wrong_shape_is_refused():
    module = SideBySide.build(dict(), "torch").fast
    with pytest.raises(ValueError, match=r"codebook_transform_fn must return a tensor of shape \(C, b, n, K, d\) == "
                                         r"\(1, 2, 12, 16, 8\), got a tensor of shape \(1, 16, 8\)"):
        module(torch.randn(2, 12, DIM), codebook_transform_fn=lambda embed: embed)
    with pytest.raises(TypeError, match="codebook_transform_fn must be callable"):
        module(torch.randn(2, 12, DIM), codebook_transform_fn=3)


# ---- the streamed softmax terms against their dense definitions, across chunk boundaries ----------
def _dense(rows, codes, targets, cosine, positions, temperature):
    logits = torch.stack([code_logits(rows[c], codes[c], cosine) for c in range(rows.shape[0])])
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
    probs = (logits * temperature).softmax(-1).reshape(rows.shape[0], -1, positions, logits.shape[-1]).mean((0, 1))
    return ce, (probs * probs.clamp_min(1e-5).log()).sum(-1).mean()


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("num_codes", [1, 3, 33])
def test_streamed_softmax_losses_equal_the_dense_ones_across_chunks(monkeypatch, cosine, num_codes):
    monkeypatch.setattr(softmax_losses, "CHUNK_LOGITS", 40)  # chunks of 1 to 40 rows
    generator = torch.Generator().manual_seed(num_codes)
    rows = torch.randn(2, 3 * 11, 5, generator=generator, dtype=torch.float64)
    codes = torch.randn(2, num_codes, 5, generator=generator, dtype=torch.float64)
    if cosine:
        rows, codes = F.normalize(rows, dim=-1), F.normalize(codes, dim=-1)
    codes[1, 0] = rows[1, 4]  # a zero distance: vqp's clamp holds it and passes no gradient
    targets = torch.randint(-1, num_codes, (2, 33), generator=generator)
    upstream = torch.tensor([0.7, -1.3], dtype=torch.float64)
    results = []
    for fn in (_dense, lambda *args: streamed(*args[:4], cross_entropy=True, diversity=True, positions=args[4],
                                              temperature=args[5])):
        r, e = rows.clone().requires_grad_(), codes.clone().requires_grad_()
        ce, diversity = fn(r, e, targets, cosine, 11, 2.5)
        (upstream[0] * ce + upstream[1] * diversity).backward()
        results.append((ce, diversity, r.grad, e.grad))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])


def test_streamed_gumbel_straight_through_gradient_equals_vqps(monkeypatch):
    monkeypatch.setattr(softmax_losses, "CHUNK_LOGITS", 30)
    generator = torch.Generator().manual_seed(2)
    rows = torch.randn(37, 6, generator=generator, dtype=torch.float64)
    codes = torch.randn(9, 6, generator=generator, dtype=torch.float64)
    upstream = torch.randn(37, 6, generator=generator, dtype=torch.float64)
    grads = []
    for streamed_term in (False, True):
        r, e = rows.clone().requires_grad_(), codes.clone().requires_grad_()
        logits = code_logits(r, e, False)
        one_hot = F.one_hot(logits.argmax(-1), 9).to(logits.dtype)
        if streamed_term:
            quantized = one_hot @ e + GumbelStraightThrough.apply(r, e, 0.7, False)
        else:  # vqp's gumbel_sample(straight_through=True) then its einsum with the codebook
            probs = (logits / 0.7).softmax(-1)
            quantized = (one_hot + probs - probs.detach()) @ e
        (quantized * upstream).sum().backward()
        grads.append((r.grad, e.grad))
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])


# ---- topk: the k nearest codes (fastvq.nearest_codes), vqp's per-code loss, no codebook update ---------
TOPK_CONFIGS = {
    "defaults": (dict(), (2, 12, DIM), 3),
    "straight_through_estimator": (dict(rotation_trick=False), (2, 12, DIM), 2),
    "cosine": (dict(use_cosine_sim=True), (2, 12, DIM), 3),
    "learnable": (dict(ema_update=False, learnable_codebook=True), (2, 12, DIM), 3),
    "projection": (dict(codebook_dim=4), (2, 12, DIM), 4),
    "no_commitment_diversity_orthogonal": (dict(commitment_weight=0.0, codebook_diversity_loss_weight=0.3,
                                                orthogonal_reg_weight=0.2), (2, 12, DIM), 3),
    "dead_codes_untouched": (dict(threshold_ema_dead_code=2), (2, 12, DIM), 2),
    "kmeans_init": (dict(kmeans_init=True, kmeans_iters=3), (3, 12, DIM), 2),
    "image_fmap": (dict(accept_image_fmap=True), (2, DIM, 3, 4), 3),
    "fmap_3d": (dict(accept_3d_fmap=True), (2, DIM, 2, 3, 2), 2),
    "channel_first": (dict(channel_last=False), (2, DIM, 12), 3),
    "one_token": (dict(), (5, DIM), 3),
    "k_clipped_to_codebook_size": (dict(), (2, 5, DIM), CODES + 4),
}


def _skip_without_topk_kernel(backend):
    from fastvq.backends.cpu import CpuBackend

    reasons = CpuBackend().op_not_supported_reasons("nearest_codes") if backend == "cpu" else []
    if reasons:
        pytest.skip(f"the cpu top-k kernel has not landed: {reasons[0]}")


@pytest.mark.parametrize("name", list(TOPK_CONFIGS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_topk_matches_vector_quantize(name, mode, backend):
    _skip_without_topk_kernel(backend)
    kwargs, shape, k = TOPK_CONFIGS[name]
    pair = SideBySide.build(kwargs, backend)
    pair.train(mode == "train")
    for step in range(STEPS):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(step))
        pair.step(x, step, dict(topk=k))


@pytest.mark.parametrize("use_lens", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_topk_with_a_mask_matches_vector_quantize(use_lens, mode, backend):
    _skip_without_topk_kernel(backend)
    pair = SideBySide.build(dict(return_zeros_for_masked_padding=mode == "train"), backend)
    pair.train(mode == "train")
    for step in range(STEPS):
        x = torch.randn(3, 10, DIM, generator=torch.Generator().manual_seed(step))
        lens = torch.tensor([10, 4, 7 - step])
        masking = dict(lens=lens) if use_lens else dict(mask=torch.arange(10) < lens[:, None])
        pair.step(x, step, dict(topk=3, **masking))


def test_topk_above_the_kernels_limit_matches_vector_quantize():
    import vector_quantize_pytorch as vqp

    torch.manual_seed(0)
    reference = vqp.VectorQuantize(DIM, 80).eval()
    from fastvq import FastVectorQuantizer

    fast = FastVectorQuantizer(DIM, 80, backend="torch").eval()
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(3, 7, DIM, generator=torch.Generator().manual_seed(1))
    (q_ref, i_ref, l_ref), (q_fast, i_fast, l_fast) = reference(x, topk=70), fast(x, topk=70)
    assert torch.equal(i_fast, i_ref)
    torch.testing.assert_close(q_fast, q_ref, **TOLERANCES[torch.float32])
    torch.testing.assert_close(l_fast, l_ref, **TOLERANCES[torch.float32])


def test_topk_arguments_vqp_refuses_are_refused():
    from fastvq import FastVectorQuantizer

    x = torch.randn(2, 5, DIM)
    with pytest.raises(ValueError, match=r"topk must be an int >= 1 .*got 0"):
        FastVectorQuantizer(DIM, CODES)(x, topk=0)
    with pytest.raises(ValueError, match=r"topk needs heads == 1 .*got heads=2"):
        FastVectorQuantizer(DIM, CODES, heads=2)(x, topk=2)
    with pytest.raises(ValueError, match=r"not compatible with commitment_use_cross_entropy_loss=True"):
        FastVectorQuantizer(DIM, CODES, commitment_use_cross_entropy_loss=True)(x, topk=2)


# ---- stochastic_sample_codes: fastvq's draws with vqp's noise replaced by fastvq's hash ----------
class FastvqNoiseInVqp:
    """Replaces vqp's gumbel_noise by fastvq's: the same torch.randint call for one seed per
    codebook (so both libraries leave torch's RNG in the same state) and reference.sample_noise at
    temperature 1. vqp then samples argmax(logits/T + g), fastvq argmin(−logits − float32(T·g)): the
    same codes up to float32 rounding, so everything downstream must match side by side."""

    def __init__(self, monkeypatch):
        import vector_quantize_pytorch.vector_quantize_pytorch as module

        monkeypatch.setattr(module, "gumbel_noise", self)

    def __call__(self, logits):
        from fastvq import reference
        from fastvq.nn.code_choice import SEED_HIGH

        heads, rows, codes = logits.shape
        seeds = torch.randint(0, SEED_HIGH, (heads,), dtype=torch.int64).tolist()
        noise = [reference.sample_noise(seed, torch.arange(rows), torch.arange(codes), 1.0) for seed in seeds]
        return torch.stack(noise).to(logits.dtype)


SAMPLING_CONFIGS = {
    "defaults": (dict(stochastic_sample_codes=True), {}),
    "temperature": (dict(stochastic_sample_codes=True, sample_codebook_temp=0.3), {}),
    "forward_temperature": (dict(stochastic_sample_codes=True), dict(sample_codebook_temp=2.5)),
    "zero_temperature_is_argmin": (dict(stochastic_sample_codes=True), dict(sample_codebook_temp=0.0)),
    "cosine_heads": (dict(stochastic_sample_codes=True, use_cosine_sim=True, heads=2, separate_codebook_per_head=True),
                     {}),
    "shared_heads_dead_codes": (dict(stochastic_sample_codes=True, heads=2, threshold_ema_dead_code=2), {}),
    "learnable_cross_entropy": (dict(stochastic_sample_codes=True, ema_update=False, learnable_codebook=True,
                                     commitment_use_cross_entropy_loss=True), {}),
    "gumbel_straight_through": (dict(stochastic_sample_codes=True, straight_through=True, rotation_trick=False,
                                     codebook_dim=4, route_gradients_to_input=False, sample_codebook_temp=0.5), {}),
    "topk": (dict(stochastic_sample_codes=True, sample_codebook_temp=0.7), dict(topk=3)),
}


@pytest.mark.parametrize("name", list(SAMPLING_CONFIGS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_stochastic_sampling_matches_vector_quantize_given_the_same_noise(monkeypatch, name, mode, backend):
    kwargs, forward_kwargs = SAMPLING_CONFIGS[name]
    FastvqNoiseInVqp(monkeypatch)
    pair = SideBySide.build(kwargs, backend)
    pair.train(mode == "train")
    for step in range(STEPS):
        x = torch.randn(2, 12, DIM, generator=torch.Generator().manual_seed(step))
        pair.step(x, step, forward_kwargs)


def test_stochastic_sampling_is_reproducible_under_manual_seed_and_samples():
    from fastvq import FastVectorQuantizer

    module = FastVectorQuantizer(DIM, CODES, stochastic_sample_codes=True, sample_codebook_temp=5.0,
                                 ema_update=False)
    x = torch.randn(4, 50, DIM, generator=torch.Generator().manual_seed(0))
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(module(x)[1])
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    _, nearest, _ = module.eval()(x)  # eval never samples
    assert not torch.equal(runs[0], nearest)


def test_forward_with_indices_in_the_inputs_layout_equals_vqps_flattened_form():
    pair = SideBySide.build(dict(accept_image_fmap=True), "torch")
    x = torch.randn(2, DIM, 3, 4, generator=torch.Generator().manual_seed(5))
    given = torch.randint(-1, CODES, (2, 12), generator=torch.Generator().manual_seed(6))
    pair.train(False)
    _, flat = pair.fast(x, indices=given)
    _, image = pair.fast(x, indices=given.view(2, 3, 4))
    _, want = pair.reference(x, indices=given)
    torch.testing.assert_close(image, flat, rtol=0, atol=0)
    torch.testing.assert_close(flat, want, **TOLERANCES[torch.float32])


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most elements any op's output had (every intermediate of forward and backward)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kwargs", [dict(codebook_diversity_loss_weight=0.5, commitment_use_cross_entropy_loss=True,
                                         stochastic_sample_codes=True),
                                    dict(straight_through=True, rotation_trick=False, route_gradients_to_input=False,
                                         stochastic_sample_codes=True)],
                         ids=["cross_entropy_diversity", "gumbel_straight_through"])
def test_softmax_terms_and_sampling_never_hold_rows_by_codes(monkeypatch, kwargs):
    """1000 rows, K = 100, d = 4: N×K would be 100000 elements; every tensor of the training step,
    forward and backward, stays at most max(N·d, positions·K, K·d, chunk) = 4000."""
    from fastvq import FastVectorQuantizer

    monkeypatch.setattr(softmax_losses, "CHUNK_LOGITS", 1000)
    module = FastVectorQuantizer(4, 100, backend="cpu", **kwargs).train()
    x = torch.randn(50, 20, 4, requires_grad=True)
    with LargestTensor() as mode:
        quantized, _, loss = module(x)
        (quantized.sum() + loss).backward()
    assert x.grad is not None
    assert mode.largest <= 1000 * 4, mode.largest


@pytest.mark.parametrize("kwargs", [dict(), dict(threshold_ema_dead_code=2)], ids=["defaults", "dead_codes"])
def test_forward_with_indices_and_a_mask_matches_vector_quantize(kwargs, backend):
    pair = SideBySide.build(kwargs, backend)
    for step in range(STEPS):
        x = torch.randn(3, 10, DIM, generator=torch.Generator().manual_seed(step))
        mask = torch.arange(10) < torch.tensor([10, 4, 7 - step])[:, None]
        given = torch.randint(-1, CODES, (3, 10), generator=torch.Generator().manual_seed(9 + step))
        _run_side_by_side(pair, x, step, lambda module, inp, given=given, mask=mask: module(inp, indices=given,
                                                                                             mask=mask))
