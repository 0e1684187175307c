"""sample_code (vqp's stochastic_sample_codes as a fused Gumbel-max draw) on every (backend, device)
pair against fastvq.reference.

The noise is a hash of (seed, row, code) that every backend computes bit for bit
(reference.sample_noise), so on small-integer inputs, where every distance is exact, each
backend returns exactly the reference's indices; random inputs are judged by
reference.assert_sampled (float32 rounding of the scores only). The draw itself is checked
against softmax(logits / temperature) with a fixed seed.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastvq import ops, reference

from conftest import NON_CONTIGUOUS_LAYOUTS, non_contiguous_rows, randn, skip_if_slow, small_integers, to_cpu

SHAPES = [(0, 3, 5), (1, 1, 1), (1, 33, 3), (3, 3, 64), (33, 257, 3), (257, 33, 33), (1030, 3, 7), (300, 1030, 16)]
SEEDS = [0, 12345, 2**40 + 17, -(2**62) + 5]


def sample(pair, x, codebook, temperature, seed, cosine):
    x, codebook = pair.to(x, codebook)
    pair.require(x, codebook, op="sample_code")
    return to_cpu(ops.sample_code(x, codebook, temperature, seed, cosine, pair.backend))


@pytest.mark.parametrize("cosine", [False, True], ids=["euclidean", "cosine"])
@pytest.mark.parametrize("num_rows,num_codes,dim", SHAPES)
def test_sample_code_exact_on_integer_inputs(pair, num_rows, num_codes, dim, cosine):
    skip_if_slow(pair, num_rows, num_codes, dim)
    generator = torch.Generator().manual_seed(num_rows + num_codes + dim)
    x, codebook = small_integers(num_rows, dim, generator=generator), small_integers(num_codes, dim, generator=generator)
    if num_codes > 2:
        codebook[-1] = codebook[0]  # equal scores: the noise decides, never the index
        x[::3] = codebook[0]  # a zero distance: vqp's clamp to 1e-8
    for temperature, seed in [(1.0, SEEDS[(num_rows + dim) % 4]), (0.3, SEEDS[(num_codes + 1) % 4])]:
        got = sample(pair, x, codebook, temperature, seed, cosine)
        want = reference.sample_code(x, codebook, temperature, seed, cosine)
        assert got.dtype == torch.int64 and got.shape == (num_rows,)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("cosine", [False, True], ids=["euclidean", "cosine"])
@pytest.mark.parametrize("num_rows,num_codes,dim", SHAPES[1:])
def test_sample_code_random_inputs_by_perturbed_score(pair, num_rows, num_codes, dim, cosine):
    skip_if_slow(pair, num_rows, num_codes, dim)
    x, codebook = randn(num_rows, dim, seed=dim), randn(num_codes, dim, seed=num_codes)
    if cosine:
        x, codebook = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(codebook, dim=1)
    got = sample(pair, x, codebook, 0.7, 99, cosine)
    reference.assert_sampled(x, codebook, got, 0.7, 99, cosine)


@pytest.mark.parametrize("layout", NON_CONTIGUOUS_LAYOUTS)
def test_sample_code_non_contiguous_rows(pair, layout):
    x = non_contiguous_rows(pair, layout, 33, 9, torch.Generator().manual_seed(3))
    codebook = pair.to(randn(17, 9, seed=4))
    pair.require(x, codebook, op="sample_code")
    got = to_cpu(ops.sample_code(x, codebook, 1.5, 7, False, pair.backend))
    reference.assert_sampled(x.cpu(), codebook.cpu(), got, 1.5, 7, False)


def test_the_noise_hash_is_the_specified_uint32_arithmetic():
    """reference.sample_noise (torch int64 masking) against the spec in plain Python integers."""
    def fmix(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    for seed in SEEDS:
        lo, hi = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
        rows, codes = [0, 1, 77, 2**32 + 3], [0, 5, 2**20]
        got = reference.sample_noise(seed, torch.tensor(rows), torch.tensor(codes), 0.5)
        for i, row in enumerate(rows):
            row_key = fmix(fmix((row & 0xFFFFFFFF) ^ lo) ^ (row >> 32))
            for j, code in enumerate(codes):
                bits = fmix(row_key ^ fmix(code ^ hi ^ 0x9E3779B9))
                u = ((bits >> 9) * 2 + 1) / 2.0**24
                assert float(got[i, j]) == float(torch.tensor(0.5 * -math.log(-math.log(u)), dtype=torch.float32))


@pytest.mark.parametrize("cosine", [False, True], ids=["euclidean", "cosine"])
def test_sample_code_draws_from_softmax_of_logits_over_temperature(pair, cosine):
    """20000 draws for one vector (each row its own noise): every code's frequency lies within 5
    binomial standard deviations of softmax(logits / T) (a fixed seed, so deterministic), while
    the same frequencies are far outside that band for a wrong sign or for T ↦ 1/T."""
    skip_if_slow(pair, 20000, 5, 4)
    if pair.interpreted:
        pytest.skip("20000 rows are too many for Triton's interpreter; the exact-index cases cover it")
    x, codebook = randn(1, 4, seed=1), randn(5, 4, seed=2)
    if cosine:
        x, codebook = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(codebook, dim=1)
    temperature, draws = 0.4, 20000
    got = sample(pair, x.expand(draws, 4).contiguous(), codebook, temperature, 2024, cosine)
    frequency = torch.bincount(got, minlength=5).double() / draws
    logits = -reference.sample_scores(x.double(), codebook.double(), cosine)[0]

    def within_band(probs):
        band = 5 * (probs * (1 - probs) / draws).sqrt() + 1e-12
        return bool(((frequency - probs).abs() <= band).all())

    assert within_band(torch.softmax(logits / temperature, 0)), frequency
    assert not within_band(torch.softmax(-logits / temperature, 0))
    assert not within_band(torch.softmax(logits * temperature, 0))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_sample_code_refuses_a_temperature_that_is_not_positive_and_finite(temperature):
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got"):
        ops.sample_code(torch.randn(3, 2), torch.randn(4, 2), temperature, 0, False, "torch")
