"""ResidualVQ and GroupedResidualVQ against vector-quantize-pytorch 1.32's, side by side.

Both start from vqp's state (load_state_dict(strict=True)), take the same input, mask and
upstream gradient with the same torch seed before every step, and must agree step after step on
quantized, every level's indices (exactly; −1 for dropped levels and masked rows), the per-level
losses, all-level codes, the input gradient, every parameter's gradient and every buffer, with
test_parity_vector_quantize's judge (fastvq's error at most twice vqp's float32 error against
vqp run in float64, plus the float32 tolerance).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from fastvq import GroupedResidualVQ, ResidualVQ

from test_parity_vector_quantize import SideBySide
from test_parity_vector_quantize_extras import FastvqNoiseInVqp

vqp = pytest.importorskip("vector_quantize_pytorch")

STEPS = 3
DIM, CODES, LEVELS = 8, 16, 3
SEQUENCE = (2, 12, DIM)
MASK = torch.arange(12) < torch.tensor([12, 5])[:, None]

# name: (constructor kwargs, input shape, forward kwargs). Every item of the residual issue is a row.
CONFIGS = {
    "defaults": (dict(), SEQUENCE, {}),
    "rotation_trick_off": (dict(rotation_trick=False), SEQUENCE, {}),
    "tuple_codebook_sizes": (dict(num_quantizers=None, codebook_size=(16, 8, 12)), SEQUENCE, {}),
    "codebook_dim_projections": (dict(codebook_dim=4), SEQUENCE, {}),
    "shared_codebook": (dict(shared_codebook=True), SEQUENCE, {}),
    "shared_codebook_dead_codes": (dict(shared_codebook=True, threshold_ema_dead_code=0.3), (4, 32, DIM), {}),
    "dead_codes": (dict(threshold_ema_dead_code=2), (4, 32, DIM), {}),
    "quantize_dropout_fixed_seed": (dict(num_quantizers=5, quantize_dropout=True), SEQUENCE,
                                    dict(rand_quantize_dropout_fixed_seed=3)),
    "quantize_dropout_torch_seed": (dict(num_quantizers=5, quantize_dropout=True), SEQUENCE, {}),
    "quantize_dropout_cutoff_multiple": (dict(num_quantizers=6, quantize_dropout=True, quantize_dropout_cutoff_index=1,
                                              quantize_dropout_multiple_of=2), SEQUENCE, {}),
    "mask": (dict(), SEQUENCE, dict(mask=MASK)),
    "mask_original_padding": (dict(return_zeros_for_masked_padding=False), SEQUENCE, dict(mask=MASK)),
    "mask_projections": (dict(codebook_dim=4), SEQUENCE, dict(mask=MASK)),
    # vqp 1.32's ResidualVQ takes image feature maps only when C == H == W (its empty index tensor
    # is shaped (B, C, H, 0)); fastvq takes any, tested against the flat layout in test_residual.py.
    "image_fmap": (dict(accept_image_fmap=True), (2, DIM, DIM, DIM), {}),
    "kmeans_init": (dict(kmeans_init=True, kmeans_iters=4), (4, 64, DIM), {}),
    "cosine": (dict(use_cosine_sim=True), SEQUENCE, {}),
    "quant_grad_frac": (dict(quant_grad_frac=0.5), SEQUENCE, {}),
    "learnable_codebook": (dict(ema_update=False, learnable_codebook=True), SEQUENCE, {}),
    "commitment_and_decay": (dict(commitment_weight=0.25, decay=0.99), SEQUENCE, {}),
    "frozen_codebook": (dict(), SEQUENCE, dict(freeze_codebook=True)),
    "one_token_rows": (dict(), (7, DIM), {}),
    "return_all_codes": (dict(), SEQUENCE, dict(return_all_codes=True)),
    "orthogonal_reg": (dict(orthogonal_reg_weight=0.5, orthogonal_reg_max_codes=9), SEQUENCE, {}),
    "codebook_diversity_loss": (dict(codebook_diversity_loss_weight=0.3), SEQUENCE, {}),
    "commitment_cross_entropy": (dict(commitment_use_cross_entropy_loss=True), SEQUENCE, {}),
    "gumbel_straight_through": (dict(straight_through=True, rotation_trick=False), SEQUENCE, {}),
    "beam_1": (dict(beam_size=1), SEQUENCE, {}),
    "beam_2": (dict(beam_size=2), SEQUENCE, {}),
    "beam_4": (dict(beam_size=4), SEQUENCE, {}),
    "beam_4_rotation_trick_off": (dict(beam_size=4, rotation_trick=False), SEQUENCE, {}),
    "beam_4_from_forward": (dict(), SEQUENCE, dict(beam_size=4)),
    "beam_eval_only": (dict(beam_size=1, eval_beam_size=3), SEQUENCE, {}),
    "beam_score_weights": (dict(beam_size=3, beam_score_quantizer_weights=[1.0, 0.5, 2.0]), SEQUENCE, {}),
    "beam_mask": (dict(beam_size=3), SEQUENCE, dict(mask=MASK)),
    "beam_cosine": (dict(beam_size=4, use_cosine_sim=True), SEQUENCE, {}),
    "beam_shared_codebook": (dict(beam_size=4, shared_codebook=True), SEQUENCE, {}),
    "beam_shared_codebook_dead_codes": (dict(beam_size=2, shared_codebook=True, threshold_ema_dead_code=0.3),
                                        (4, 32, DIM), {}),
    "beam_kmeans_init": (dict(beam_size=3, kmeans_init=True, kmeans_iters=3), (1, 64, DIM), {}),
    "beam_quantize_dropout": (dict(beam_size=2, num_quantizers=5, quantize_dropout=True), SEQUENCE, {}),
    "beam_quant_grad_frac": (dict(beam_size=3, quant_grad_frac=0.3), SEQUENCE, {}),
    "beam_learnable_codebook": (dict(beam_size=3, ema_update=False, learnable_codebook=True), SEQUENCE, {}),
    "beam_projections": (dict(beam_size=3, codebook_dim=4), SEQUENCE, {}),
    "beam_orthogonal_reg": (dict(beam_size=3, orthogonal_reg_weight=0.5, orthogonal_reg_active_codes_only=True,
                                 orthogonal_reg_max_codes=9), SEQUENCE, {}),
    "beam_one_token_rows": (dict(beam_size=2), (9, DIM), {}),
    # the diversity loss of every beam's inputs is added to each candidate's loss
    "beam_2_codebook_diversity_loss": (dict(beam_size=2, codebook_diversity_loss_weight=0.3), SEQUENCE, {}),
    "beam_4_codebook_diversity_loss": (dict(beam_size=4, codebook_diversity_loss_weight=0.5,
                                            codebook_diversity_temperature=2.0), SEQUENCE, {}),
    "beam_4_diversity_mask_cosine": (dict(beam_size=4, codebook_diversity_loss_weight=0.3, use_cosine_sim=True),
                                     SEQUENCE, dict(mask=MASK)),
    "beam_2_diversity_learnable_codebook": (dict(beam_size=2, codebook_diversity_loss_weight=0.3, ema_update=False,
                                                 learnable_codebook=True), SEQUENCE, {}),
}

# stochastic_sample_codes with vqp's gumbel noise replaced by fastvq's hash (FastvqNoiseInVqp)
SAMPLING_BEAM_CONFIGS = {
    "beam_2_stochastic": (dict(beam_size=2, stochastic_sample_codes=True), SEQUENCE, {}),
    "beam_4_stochastic": (dict(beam_size=4, stochastic_sample_codes=True, sample_codebook_temp=0.7), SEQUENCE, {}),
    "beam_4_stochastic_mask": (dict(beam_size=4, stochastic_sample_codes=True), SEQUENCE, dict(mask=MASK)),
    "beam_2_stochastic_cosine_dropout": (dict(beam_size=2, stochastic_sample_codes=True, use_cosine_sim=True,
                                              num_quantizers=5, quantize_dropout=True), SEQUENCE, {}),
    "beam_4_stochastic_diversity": (dict(beam_size=4, stochastic_sample_codes=True,
                                         codebook_diversity_loss_weight=0.3), SEQUENCE, {}),
    "beam_2_stochastic_forward_temperature": (dict(beam_size=2, stochastic_sample_codes=True), SEQUENCE,
                                              dict(sample_codebook_temp=2.5)),
}

GROUPED_CONFIGS = {
    "groups_2": (dict(groups=2), SEQUENCE, {}),
    "groups_2_quantize_dropout": (dict(groups=2, num_quantizers=4, quantize_dropout=True), SEQUENCE, {}),
    "groups_2_mask": (dict(groups=2), SEQUENCE, dict(mask=MASK)),
    "groups_4_all_codes": (dict(groups=4), SEQUENCE, dict(return_all_codes=True)),
    "groups_2_image_fmap": (dict(groups=2, accept_image_fmap=True), (2, DIM, 4, 4), {}),
    "groups_2_beam": (dict(groups=2, beam_size=3), SEQUENCE, {}),
}


class ResidualSideBySide(SideBySide):
    """SideBySide's judge for the residual modules: outputs (quantized, indices, losses[, codes])."""

    @classmethod
    def build_residual(cls, kwargs: dict, backend: str, grouped: bool = False):
        kwargs = {"dim": DIM, "num_quantizers": LEVELS, "codebook_size": CODES, **kwargs}
        if kwargs["num_quantizers"] is None:
            del kwargs["num_quantizers"]
        torch.manual_seed(0)
        reference = (vqp.GroupedResidualVQ if grouped else vqp.ResidualVQ)(**kwargs)
        fast = (GroupedResidualVQ if grouped else ResidualVQ)(backend=backend, **kwargs)
        fast.load_state_dict(reference.state_dict(), strict=True)
        return cls(reference, fast)

    def residual_step(self, x: torch.Tensor, step: int, forward_kwargs: dict):
        inputs = [x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()]
        outputs = []
        for module, inp in zip(self.modules(), inputs):
            module.zero_grad(set_to_none=True)
            torch.manual_seed(1000 + step)  # the same draws for dropout, k-means and dead codes
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                outputs.append(module(inp, **forward_kwargs))
        ref, fast, exact = outputs
        assert len(ref) == len(fast), f"step {step}: {len(fast)} returns, vqp {len(ref)}"
        assert torch.equal(fast[1], ref[1]), (
            f"step {step}: indices differ at {(fast[1] != ref[1]).nonzero()[:5].tolist()}")
        self.assert_close(fast[0], ref[0], exact[0], f"step {step} quantized")
        self.assert_close(fast[2].detach(), ref[2].detach(), exact[2].detach(), f"step {step} losses")
        if len(ref) > 3:
            for level, (got, want, exact_codes) in enumerate(zip(*_as_tuples(fast[3], ref[3], exact[3]))):
                self.assert_close(got.detach(), want.detach(), exact_codes.detach(), f"step {step} codes {level}")
        upstream = torch.randn(ref[0].shape, generator=torch.Generator().manual_seed(step))
        for out in outputs:
            total = (out[0] * upstream.to(out[0].dtype)).sum() + out[2].sum()
            if total.requires_grad:
                total.backward()
        assert (inputs[0].grad is None) == (inputs[1].grad is None), f"step {step}: input grad presence"
        if inputs[0].grad is not None:
            self.assert_close(inputs[1].grad, inputs[0].grad, inputs[2].grad, f"step {step} input grad")
        named = [dict(module.named_parameters()) for module in self.modules()]
        assert named[0].keys() == named[1].keys()
        for name, param in named[0].items():
            assert (param.grad is None) == (named[1][name].grad is None), f"step {step}: grad presence of {name}"
            if param.grad is not None:
                self.assert_close(named[1][name].grad, param.grad, named[2][name].grad, f"step {step} grad of {name}")
        self.compare_state(f"step {step}")
        return outputs


class BeamNoiseInVqp(FastvqNoiseInVqp):
    """FastvqNoiseInVqp for beam search: vqp's codebook takes a level's (B, N, beams, d) input with B
    on its heads axis, so its noise comes as (B, N·beams, K) for one codebook. vqp's own noise is
    i.i.d. either way; fastvq's is one seed for the codebook over rows numbered across B."""

    def __call__(self, logits):
        return super().__call__(logits.reshape(1, -1, logits.shape[-1])).view_as(logits)


def _as_tuples(*values):
    return [v if isinstance(v, tuple) else (v,) for v in values]


# Every row on the cpu backend; a few on the torch oracle too (the ops' own tests cover every backend).
ORACLE_ROWS = ("defaults", "shared_codebook", "quantize_dropout_torch_seed", "mask", "beam_4", "beam_mask",
               "groups_2", "groups_2_beam")


def _rows(configs):
    return [(name, "cpu") for name in configs] + [(name, "torch") for name in configs if name in ORACLE_ROWS]


def _run(pair, shape, forward_kwargs, mode):
    pair.train(mode == "train")
    dropped = 0
    for step in range(STEPS):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(step))
        ref = pair.residual_step(x, step, forward_kwargs)[0]
        dropped += int((ref[1] == -1).sum())
    return dropped


@pytest.mark.parametrize("name,backend", _rows(CONFIGS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_residual_vq_matches_vqp_step_by_step(name, backend, mode):
    kwargs, shape, forward_kwargs = CONFIGS[name]
    dropped = _run(ResidualSideBySide.build_residual(kwargs, backend), shape, forward_kwargs, mode)
    if kwargs.get("quantize_dropout") and mode == "train":
        assert dropped > 0, "no level was dropped in three steps: the dropout rows test nothing"


@pytest.mark.parametrize("name", list(SAMPLING_BEAM_CONFIGS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_beam_search_with_stochastic_sampling_matches_vqp_given_the_same_noise(monkeypatch, name, mode):
    BeamNoiseInVqp(monkeypatch)
    kwargs, shape, forward_kwargs = SAMPLING_BEAM_CONFIGS[name]
    dropped = _run(ResidualSideBySide.build_residual(kwargs, "cpu"), shape, forward_kwargs, mode)
    if kwargs.get("quantize_dropout") and mode == "train":
        assert dropped > 0, "no level was dropped in three steps: the dropout row tests nothing"


@pytest.mark.parametrize("name,backend", _rows(GROUPED_CONFIGS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_grouped_residual_vq_matches_vqp_step_by_step(name, backend, mode):
    kwargs, shape, forward_kwargs = GROUPED_CONFIGS[name]
    dropped = _run(ResidualSideBySide.build_residual(kwargs, backend, grouped=True), shape, forward_kwargs, mode)
    if kwargs.get("quantize_dropout") and mode == "train":
        assert dropped > 0


def test_shared_codebook_revives_dead_codes_at_the_end_of_a_step_as_vqp():
    """6 rows per level and 16 dead codes: the levels revive some, the end of the step (vqp: from batch 0's
    level inputs) the rest. One step only: the next would search among near-duplicate codes (a row revived
    twice, once moved by the EMA step), whose order is rounding's to decide."""
    pair = ResidualSideBySide.build_residual(dict(shared_codebook=True, threshold_ema_dead_code=2), "cpu")
    before = pair.reference.layers[0]._codebook.embed.clone()
    pair.residual_step(torch.randn(2, 3, DIM, generator=torch.Generator().manual_seed(0)), 0, {})
    # a code revived by the last level or at the end keeps cluster_size == 2; the last level has 6 rows
    revived_late = int((pair.reference.layers[0]._codebook.cluster_size == 2).sum())
    assert revived_late > 6 and not torch.equal(before, pair.reference.layers[0]._codebook.embed)


@pytest.mark.parametrize("grouped", [False, True])
def test_codes_and_output_from_indices_match_vqp(grouped):
    pair = ResidualSideBySide.build_residual(dict(groups=2) if grouped else dict(quantize_dropout=True), "cpu",
                                             grouped=grouped)
    pair.train(False)
    x = torch.randn(SEQUENCE, generator=torch.Generator().manual_seed(5))
    indices = pair.reference(x)[1]
    if not grouped:
        indices = indices.clone()
        indices[0, :4, 1:] = -1  # dropped levels
        indices = indices[..., :2]  # coarse codes: padded with -1 (quantize dropout)
    for method in ("get_codes_from_indices", "get_output_from_indices"):
        want = getattr(pair.reference, method)(indices)
        got = getattr(pair.fast, method)(indices)
        pair.assert_close(got.detach(), want.detach(), getattr(pair.exact, method)(indices).detach(), method)


CHECKPOINT_CONFIGS = {
    "defaults": (dict(), False),
    "projections_learnable": (dict(codebook_dim=4, ema_update=False, learnable_codebook=True), False),
    "shared_kmeans": (dict(shared_codebook=True, kmeans_init=True), False),
    "tuple_sizes_cosine": (dict(num_quantizers=None, codebook_size=(4, 8), use_cosine_sim=True), False),
    "grouped": (dict(groups=2, codebook_dim=2), True),
}


@pytest.mark.parametrize("name", list(CHECKPOINT_CONFIGS))
def test_checkpoints_load_both_ways_with_strict(name):
    kwargs, grouped = CHECKPOINT_CONFIGS[name]
    kwargs = {"dim": DIM, "num_quantizers": LEVELS, "codebook_size": CODES, **kwargs}
    if kwargs["num_quantizers"] is None:
        del kwargs["num_quantizers"]
    theirs = (vqp.GroupedResidualVQ if grouped else vqp.ResidualVQ)(**kwargs)
    ours = (GroupedResidualVQ if grouped else ResidualVQ)(**kwargs)
    x = torch.randn(SEQUENCE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.train()(x)  # a trained state differs from vqp's fresh one
    for source, target in ((ours, theirs), (theirs, ours)):
        state = source.state_dict()
        target.load_state_dict(state, strict=True)
        loaded = target.state_dict()
        assert list(loaded) == list(state)
        for key, value in state.items():
            assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
            assert torch.equal(loaded[key], value), key
    ours.eval(), theirs.eval()
    assert torch.equal(ours(x)[1], theirs(x)[1])
