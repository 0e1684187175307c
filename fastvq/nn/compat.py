"""vector-quantize-pytorch keyword arguments that fastvq accepts by name but does not implement.

A model that swaps ``VectorQuantize`` for ``FastVectorQuantizer`` (or ``ResidualVQ``)
must either work or fail loudly. So each of these kwargs is accepted at its
vector-quantize-pytorch default, where it changes nothing, and any other value
raises a ValueError naming the kwarg. Names that vector-quantize-pytorch does not
know raise TypeError, as Python would.
"""
from __future__ import annotations

# VectorQuantize.__init__ (vector-quantize-pytorch 1.32) kwargs fastvq does not implement.
VECTOR_QUANTIZE_UNSUPPORTED = {
    "layernorm_after_project_in": False,
    "commitment_use_cross_entropy_loss": False,
    "orthogonal_reg_weight": 0.0,
    "orthogonal_reg_active_codes_only": False,
    "orthogonal_reg_max_codes": None,
    "codebook_diversity_loss_weight": 0.0,
    "codebook_diversity_temperature": 100.0,
    "stochastic_sample_codes": False,
    "sample_codebook_temp": 1.0,
    "straight_through": False,
    "directional_reparam": False,
    "directional_reparam_variance": 5e-3,
    "sync_affine_param": False,
    "vq_bridge": None,
    "manual_ema_update": False,
    "in_place_codebook_optimizer": None,
    "manual_in_place_optimizer_update": False,
    "affine_param": False,
    "affine_param_batch_decay": 0.99,
    "affine_param_codebook_decay": 0.9,
    "sync_update_v": 0.0,
    "return_zeros_for_masked_padding": True,
    "route_gradients_to_input": True,
}

# rotation_trick defaults to None (vector-quantize-pytorch then uses the rotation trick when
# dim > 1); fastvq always uses the straight-through estimator, so None and False are accepted.
STRAIGHT_THROUGH_ROTATION_TRICK = (None, False)

# VectorQuantize.forward kwargs fastvq does not implement (x, freeze_codebook are implemented).
FORWARD_UNSUPPORTED = {
    "indices": None,
    "mask": None,
    "lens": None,
    "topk": None,
    "sample_codebook_temp": None,
    "return_loss_breakdown": False,
    "codebook_transform_fn": None,
    "ema_update_weight": None,
    "accum_ema_update": False,
    "ema_update": None,
}

# ResidualVQ.__init__ kwargs fastvq does not implement (the rest go to each FastVectorQuantizer).
RESIDUAL_VQ_UNSUPPORTED = {
    "shared_codebook": False,
    "diveq": False,
    "heads": 1,
    "quantize_dropout": False,
    "quantize_dropout_cutoff_index": 0,
    "quantize_dropout_multiple_of": 1,
    "implicit_neural_codebook": False,
    "mlp_kwargs": {},
    "beam_size": None,
    "eval_beam_size": None,
    "beam_score_quantizer_weights": None,
    "quant_grad_frac": 0.0,
    "return_zeros_for_masked_padding": True,
}

RESIDUAL_FORWARD_UNSUPPORTED = {
    "mask": None,
    "indices": None,
    "return_all_codes": False,
    "sample_codebook_temp": None,
    "beam_size": None,
    "rand_quantize_dropout_fixed_seed": None,
}


def _is_default(value, default) -> bool:
    if default is None:
        return value is None
    if hasattr(value, "shape"):  # a tensor is never a default here
        return False
    try:
        return bool(value == default)
    except Exception:  # noqa: BLE001  (a value that cannot be compared is not the default)
        return False


def reject_unsupported(owner: str, kwargs: dict, unsupported: dict) -> None:
    """Raise for unknown names (TypeError) and for non-default unsupported values (ValueError)."""
    for name, value in kwargs.items():
        if name not in unsupported:
            raise TypeError(f"{owner} got an unexpected keyword argument {name!r}")
        default = unsupported[name]
        if not _is_default(value, default):
            raise ValueError(
                f"{owner} does not implement vector-quantize-pytorch's {name}={value!r}; "
                f"only the default {name}={default!r} is accepted"
            )
