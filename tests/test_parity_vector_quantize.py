"""FastVectorQuantizer against vector-quantize-pytorch 1.32's VectorQuantize, side by side.

Both start from one state (vqp's, copied with load_state_dict(strict=True)) and the same RNG
seed before every step, take the same inputs and the same upstream gradient, and must agree on
quantized, indices (exactly), loss and its breakdown, the input gradient, every parameter's
gradient and every buffer, step after step, within the float32 tolerance of the table.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from fastvq import FastVectorQuantizer

from conftest import TOLERANCES

vqp = pytest.importorskip("vector_quantize_pytorch")

STEPS = 3
DIM, CODES = 8, 16

# (constructor kwargs, input shape, forward kwargs maker). Every item of the parity issue is a row.
CONFIGS = {
    "defaults": (dict(), (2, 12, DIM)),
    "straight_through": (dict(rotation_trick=False), (2, 12, DIM)),
    "dim1_defaults_to_straight_through": (dict(), (2, 12, 1)),
    "cosine": (dict(use_cosine_sim=True), (2, 12, DIM)),
    "heads_projected": (dict(heads=2), (2, 12, DIM)),
    "heads_separate_projected": (dict(heads=2, separate_codebook_per_head=True), (2, 12, DIM)),
    "heads_codebook_dim": (dict(heads=2, codebook_dim=4), (2, 12, DIM)),
    "heads_separate_codebook_dim": (dict(heads=4, codebook_dim=2, separate_codebook_per_head=True), (2, 12, DIM)),
    "codebook_dim_projection": (dict(codebook_dim=4), (2, 12, DIM)),
    "layernorm_after_project_in": (dict(codebook_dim=4, layernorm_after_project_in=True), (2, 12, DIM)),
    "learnable": (dict(ema_update=False, learnable_codebook=True), (2, 12, DIM)),
    "learnable_straight_through": (dict(ema_update=False, learnable_codebook=True, rotation_trick=False),
                                   (2, 12, DIM)),
    "frozen": (dict(freeze_codebook=True), (2, 12, DIM)),
    "frozen_learnable": (dict(freeze_codebook=True, ema_update=False, learnable_codebook=True), (2, 12, DIM)),
    "no_ema_update": (dict(ema_update=False), (2, 12, DIM)),
    "dead_codes": (dict(threshold_ema_dead_code=2), (2, 12, DIM)),
    "dead_codes_learnable": (dict(threshold_ema_dead_code=2, ema_update=False, learnable_codebook=True),
                             (2, 12, DIM)),
    "kmeans_init": (dict(kmeans_init=True, kmeans_iters=4), (3, 12, DIM)),
    "kmeans_init_cosine": (dict(kmeans_init=True, use_cosine_sim=True), (3, 12, DIM)),
    "commitment_and_decay": (dict(commitment_weight=0.25, decay=0.99), (2, 12, DIM)),
    "no_commitment": (dict(commitment_weight=0.0), (2, 12, DIM)),
    "orthogonal_reg": (dict(orthogonal_reg_weight=0.5), (2, 12, DIM)),
    "orthogonal_reg_active_max": (dict(orthogonal_reg_weight=0.5, orthogonal_reg_active_codes_only=True,
                                       orthogonal_reg_max_codes=5), (2, 12, DIM)),
    "manual_ema_update": (dict(manual_ema_update=True), (2, 12, DIM)),
    "image_fmap": (dict(accept_image_fmap=True), (2, DIM, 3, 4)),
    "image_fmap_heads": (dict(accept_image_fmap=True, heads=2, codebook_dim=4), (2, DIM, 3, 4)),
    "fmap_3d": (dict(accept_3d_fmap=True), (2, DIM, 2, 3, 2)),
    "channel_first": (dict(channel_last=False), (2, DIM, 12)),
    "one_token": (dict(), (5, DIM)),
    "no_route_to_input": (dict(route_gradients_to_input=False), (2, 12, DIM)),
    # softmax terms over all codes (streamed): cross-entropy commitment, codebook diversity, gumbel straight-through
    "cross_entropy_commitment": (dict(commitment_use_cross_entropy_loss=True, commitment_weight=0.7), (2, 12, DIM)),
    "cross_entropy_cosine_heads": (dict(commitment_use_cross_entropy_loss=True, use_cosine_sim=True, heads=2,
                                        separate_codebook_per_head=True, codebook_dim=4), (2, 12, DIM)),
    "diversity": (dict(codebook_diversity_loss_weight=0.5), (2, 12, DIM)),
    "diversity_low_temperature": (dict(codebook_diversity_loss_weight=0.5, codebook_diversity_temperature=0.3),
                                  (3, 5, DIM)),
    "diversity_cosine_shared_heads": (dict(codebook_diversity_loss_weight=0.5, use_cosine_sim=True, heads=2),
                                      (2, 12, DIM)),
    "diversity_image_fmap": (dict(codebook_diversity_loss_weight=0.5, accept_image_fmap=True), (2, DIM, 3, 4)),
    "diversity_one_token": (dict(codebook_diversity_loss_weight=0.5), (7, DIM)),
    "learnable_cross_entropy_diversity": (dict(ema_update=False, learnable_codebook=True, codebook_diversity_loss_weight=0.3,
                                               commitment_use_cross_entropy_loss=True), (2, 12, DIM)),
    "gumbel_straight_through": (dict(straight_through=True, rotation_trick=False), (2, 12, DIM)),
    "gumbel_straight_through_to_projection": (dict(straight_through=True, rotation_trick=False, codebook_dim=4,
                                                   route_gradients_to_input=False, sample_codebook_temp=0.6),
                                              (2, 12, DIM)),
    "gumbel_straight_through_cosine": (dict(straight_through=True, rotation_trick=False, use_cosine_sim=True,
                                            route_gradients_to_input=False, heads=2, separate_codebook_per_head=True),
                                       (2, 12, DIM)),
}

MASKED_CONFIGS = {
    "mask": dict(),
    "mask_dead_codes": dict(threshold_ema_dead_code=2),
    "mask_orig_padding": dict(return_zeros_for_masked_padding=False),
    "mask_cosine": dict(use_cosine_sim=True),
    "mask_kmeans_init": dict(kmeans_init=True, kmeans_iters=3),
    "mask_cross_entropy_diversity": dict(commitment_use_cross_entropy_loss=True, codebook_diversity_loss_weight=0.4),
}


class SideBySide:
    """vqp in float32 (``reference``), FastVectorQuantizer (``fast``) and vqp in float64 (``exact``),
    stepped together from one state with one seed per step.

    The judge is flash-attention's bar: fastvq's error against the float64 run may be at most twice
    vqp's own float32 error, plus the float32 tolerance of the table. Well-conditioned values thus
    agree to the table's tolerance; a gradient behind an ill-conditioned layer (a LayerNorm over 4
    features) may differ from vqp's by as much as vqp's float32 rounding differs from exact.
    """

    def __init__(self, reference, fast, with_float64: bool = True):
        self.reference, self.fast = reference, fast
        # Without the float64 run (vqp cannot take float64 with ema_update_weight or accum_ema_update),
        # the bound is the table's tolerance around vqp's float32 values.
        self.exact = copy.deepcopy(reference).double() if with_float64 else None

    @classmethod
    def build(cls, kwargs: dict, backend: str, dim: int = DIM, with_float64: bool = True):
        torch.manual_seed(0)
        reference = vqp.VectorQuantize(dim, CODES, **kwargs)
        torch.manual_seed(0)
        fast = FastVectorQuantizer(dim, CODES, backend=backend, **kwargs)
        fast.load_state_dict(reference.state_dict(), strict=True)
        return cls(reference, fast, with_float64)

    def modules(self):
        return (self.reference, self.fast) if self.exact is None else (self.reference, self.fast, self.exact)

    def train(self, mode: bool = True):
        for module in self.modules():
            module.train(mode)

    def assert_close(self, got, want, exact, what: str):
        assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape} {got.dtype} vs {want.shape}"
        exact = (want if exact is None else exact).double()
        bound = 2 * (want.double() - exact).abs() + TOLERANCES[torch.float32]["atol"]
        bound = bound + TOLERANCES[torch.float32]["rtol"] * exact.abs()
        error = (got.double() - exact).abs()
        worst = int(torch.argmax(error - bound)) if error.numel() else 0
        assert bool((error <= bound).all()), (
            f"{what}: fastvq's error {error.flatten()[worst]:.3g} exceeds the bound {bound.flatten()[worst]:.3g} "
            f"(vqp float32 {want.flatten()[worst]:.8g}, fastvq {got.flatten()[worst]:.8g}, "
            f"float64 {exact.flatten()[worst]:.8g}) at flat index {worst}")

    def step(self, x: torch.Tensor, step: int, forward_kwargs: dict, requires_grad: bool = True):
        inputs = [x.clone().requires_grad_(requires_grad), x.clone().requires_grad_(requires_grad),
                  x.double().requires_grad_(requires_grad)][:len(self.modules())]
        outputs = []
        for module, inp in zip(self.modules(), inputs):
            module.zero_grad(set_to_none=True)
            kwargs = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                      for k, v in forward_kwargs.items()} if module is self.exact else forward_kwargs
            torch.manual_seed(1000 + step)  # the same draws for dead codes, k-means and orthogonal subsets
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                outputs.append(module(inp, return_loss_breakdown=True, **kwargs))
        (q_ref, i_ref, l_ref, b_ref), (q_fast, i_fast, l_fast, b_fast) = outputs[:2]
        q_exact, _, l_exact, b_exact = outputs[2] if self.exact is not None else (None, None, None, None)
        detached = (lambda t: None if t is None else t.detach())
        assert torch.equal(i_fast, i_ref), f"step {step}: indices differ at {(i_fast != i_ref).nonzero()[:5].tolist()}"
        self.assert_close(q_fast, q_ref, q_exact, f"step {step} quantized")
        self.assert_close(l_fast.detach(), l_ref.detach(), detached(l_exact), f"step {step} loss")
        for name in ("commitment", "codebook_diversity", "orthogonal_reg"):
            self.assert_close(getattr(b_fast, name).detach(), getattr(b_ref, name).detach(),
                              None if b_exact is None else getattr(b_exact, name).detach(), f"step {step} {name}")
        upstream = torch.randn(q_ref.shape, generator=torch.Generator().manual_seed(step))
        for q, loss in [(q_ref, l_ref), (q_fast, l_fast), (q_exact, l_exact)][:len(self.modules())]:
            total = (q * upstream.to(q.dtype)).sum() + (loss.sum() if loss.requires_grad else 0)  # top-k: per code
            if total.requires_grad:
                total.backward()
        if requires_grad:
            assert (inputs[0].grad is None) == (inputs[1].grad is None), f"step {step}: input grad presence"
            if inputs[0].grad is not None:
                exact_grad = inputs[2].grad if self.exact is not None else None
                self.assert_close(inputs[1].grad, inputs[0].grad, exact_grad, f"step {step} input grad")
        named = [dict(module.named_parameters()) for module in self.modules()]
        assert named[0].keys() == named[1].keys()
        for name, param in named[0].items():
            fast_grad = named[1][name].grad
            assert (param.grad is None) == (fast_grad is None), f"step {step}: grad presence of {name}"
            if param.grad is not None:
                exact_grad = named[2][name].grad if self.exact is not None else None
                self.assert_close(fast_grad, param.grad, exact_grad, f"step {step} grad of {name}")
        self.compare_state(f"step {step}")

    def compare_state(self, when: str):
        states = [module.state_dict() for module in self.modules()]
        assert states[0].keys() == states[1].keys()
        for name, value in states[0].items():
            got = states[1][name]
            assert got.dtype == value.dtype and got.shape == value.shape, name
            if value.dtype == torch.bool:
                assert torch.equal(got, value), f"{when} buffer {name}"
            else:
                self.assert_close(got, value, states[2][name] if self.exact is not None else None,
                                  f"{when} buffer {name}")


@pytest.fixture(params=["cpu", "torch"])
def backend(request):
    return request.param


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_vector_quantize_step_by_step(name, mode, backend):
    kwargs, shape = CONFIGS[name]
    pair = SideBySide.build(kwargs, backend, dim=1 if shape[-1] == 1 else DIM)
    pair.train(mode == "train")
    for step in range(STEPS):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(step))
        pair.step(x, step, {})
        if kwargs.get("manual_ema_update"):
            pair.reference._codebook.update_ema()
            pair.exact._codebook.update_ema()
            pair.fast.update_ema()
            pair.compare_state(f"step {step} after update_ema")


@pytest.mark.parametrize("name", list(MASKED_CONFIGS))
@pytest.mark.parametrize("use_lens", [False, True])
def test_masked_rows_match_vector_quantize(name, use_lens, backend):
    pair = SideBySide.build(MASKED_CONFIGS[name], backend)
    for step in range(STEPS):
        x = torch.randn(3, 10, DIM, generator=torch.Generator().manual_seed(step))
        lens = torch.tensor([10, 4, 7 - step])
        mask = torch.arange(10) < lens[:, None]
        pair.step(x, step, dict(lens=lens) if use_lens else dict(mask=mask))


def test_input_without_grad_and_learnable_codebook(backend):
    pair = SideBySide.build(dict(ema_update=False, learnable_codebook=True), backend)
    for step in range(STEPS):
        x = torch.randn(2, 12, DIM, generator=torch.Generator().manual_seed(step))
        pair.step(x, step, {}, requires_grad=False)


def test_forward_ema_options_match(backend):
    pair = SideBySide.build(dict(), backend, with_float64=False)
    weight = torch.rand(CODES, generator=torch.Generator().manual_seed(5))
    cases = [dict(ema_update_weight=weight), dict(ema_update=False), dict(freeze_codebook=True),
             dict(ema_update_weight=lambda sums, counts: (counts > 0).to(counts.dtype))]
    for step, forward_kwargs in enumerate(cases):
        x = torch.randn(2, 12, DIM, generator=torch.Generator().manual_seed(step))
        pair.step(x, step, forward_kwargs)


def test_accumulated_ema_updates_match(backend):
    pair = SideBySide.build(dict(), backend, with_float64=False)
    for step in range(4):
        x = torch.randn(2, 12, DIM, generator=torch.Generator().manual_seed(step))
        pair.step(x, step, dict(accum_ema_update=step < 3))


def test_update_indices_and_expire_codes_match(backend):
    pair = SideBySide.build(dict(heads=2, codebook_dim=4, threshold_ema_dead_code=1.5), backend)
    for step in range(STEPS):
        x = torch.randn(2, 12, DIM, generator=torch.Generator().manual_seed(step))
        indices = torch.randint(-1, CODES, (2, 12, 2), generator=torch.Generator().manual_seed(50 + step))
        rows = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(70 + step))
        for module in pair.modules():
            dtype = torch.float64 if module is pair.exact else torch.float32
            torch.manual_seed(step)
            module.update_indices(x.to(dtype), indices)
        pair.compare_state(f"step {step} update_indices")
        for module in pair.modules():
            dtype = torch.float64 if module is pair.exact else torch.float32
            torch.manual_seed(step)
            module.expire_codes_(rows.to(dtype))
        pair.compare_state(f"step {step} expire_codes_")


@pytest.mark.parametrize("kwargs", [dict(), dict(heads=2, separate_codebook_per_head=True, codebook_dim=4),
                                    dict(accept_image_fmap=True)])
def test_codes_and_output_from_indices_match(kwargs, backend):
    pair = SideBySide.build(kwargs, backend)
    shape = (2, DIM, 3, 4) if kwargs.get("accept_image_fmap") else (2, 12, DIM)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    pair.train(False)
    _, indices, _ = pair.reference(x)
    for method in ("get_codes_from_indices", "get_output_from_indices"):
        got, want, exact = (getattr(module, method)(indices).detach() for module in pair.modules())
        pair.assert_close(got, want, exact, method)
    pair.assert_close(pair.fast.codebook, pair.reference.codebook, pair.exact.codebook, "codebook property")


def test_exact_indices_on_integer_data(backend):
    """Small integers are exact in float32, so every distance is exact and ties go to the lowest index."""
    pair = SideBySide.build(dict(), backend)
    generator = torch.Generator().manual_seed(9)
    codebook = torch.randint(-3, 4, (1, CODES, DIM), generator=generator).float()
    codebook[0, 9] = codebook[0, 2]  # a duplicate later code must never win
    for module in pair.modules():
        module._codebook.embed.data.copy_(codebook)
    x = torch.randint(-3, 4, (2, 12, DIM), generator=generator).float()
    x[0, :4] = codebook[0, [2, 9, 0, 5]]
    pair.step(x, 0, {})
    _, indices, _ = pair.fast.train(False)(x)
    assert indices[0, :4].tolist() == [2, 2, 0, 5]


@pytest.mark.parametrize("direction", ["vqp_to_fastvq", "fastvq_to_vqp"])
@pytest.mark.parametrize("kwargs", [dict(), dict(heads=2), dict(codebook_dim=4, layernorm_after_project_in=True),
                                    dict(ema_update=False, learnable_codebook=True), dict(kmeans_init=True)])
def test_checkpoints_load_both_ways_after_training(direction, kwargs, backend):
    pair = SideBySide.build(kwargs, backend)
    for step in range(2):
        x = torch.randn(2, 12, DIM, generator=torch.Generator().manual_seed(step))
        pair.step(x, step, {})
    if direction == "vqp_to_fastvq":
        loaded = FastVectorQuantizer(DIM, CODES, backend=backend, **kwargs)
        loaded.load_state_dict(pair.reference.state_dict(), strict=True)
        resumed = SideBySide(pair.reference, loaded)
    else:
        loaded = vqp.VectorQuantize(DIM, CODES, **kwargs)
        loaded.load_state_dict(pair.fast.state_dict(), strict=True)
        resumed = SideBySide(loaded, pair.fast)
    resumed.compare_state("loaded")
    # Trained further, the loaded copy keeps matching the other library's module.
    x = torch.randn(2, 12, DIM, generator=torch.Generator().manual_seed(9))
    resumed.step(x, 9, {})
