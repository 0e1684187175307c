"""The judge's slack at each precision a float32 search can run (reference.nearest_code_slack) against a CPU
emulation of what the Triton searches compute on CUDA: the centred frame (numerics.search_centre), the
centred codes and their float32 norms (nearest_code.centred_codebook), and per d-slice a tl.dot at
"ieee", "tf32" or "tf32x3", the last as Triton's F32DotTC pass rewrites it (d-slices) or as
_score_tile.tf32x3_dot computes it (x resident: the codes split once on the host, x once per program):

    A = tf32(a), α = a − A;  dot(α, B, 0) → dot(A, β, ·) → dot(A, B, ·) → + running sum

with tf32() rounding float32 to 11 significant bits (cvt.rna: nearest, ties away; also tried with ties
to even) and the tensor cores reading the small parts α, β as TF32: their low 13 bits dropped (Triton's
pass), or rounded first (tf32x3_dot). Products of TF32 numbers are exact in float32; every sum is a float32 addition.
The emulated choice must pass its precision's slack on adversarial data, and plain TF32 must fail the
tf32x3 slack on that data (so the test can fail).
"""
from __future__ import annotations

import pytest
import torch

from fastvq import reference
from fastvq.numerics import search_centre

from conftest import small_integers

LOW_13 = 0x1FFF


def to_tf32(a: torch.Tensor, mode: str) -> torch.Tensor:
    """float32 → the nearest TF32 (11 significant bits) by ``mode``: "rna" (ties away, PTX cvt.rna),
    "rne" (ties to even) or "truncate" (the low 13 bits dropped). Finite inputs."""
    bits = a.view(torch.int32).to(torch.int64)
    if mode == "rna":
        bits = bits + 0x1000
    elif mode == "rne":
        bits = bits + 0xFFF + ((bits >> 13) & 1)
    return (bits & ~LOW_13).to(torch.int32).view(torch.float32)  # sign-magnitude: rounds |a|


def slice_width(dim: int) -> int:
    """The d-slice of the Triton searches for float32 operands (nearest_code.py, block_d_for, cap 64)."""
    width = min(max(16, 1 << (dim - 1).bit_length()), 64)
    return width if dim <= width else min(max(16, 1 << (dim - 1).bit_length()), 32)


def sequential_dot(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """acc + a @ bᵀ, one float32 product and addition per term, in order."""
    for j in range(a.shape[1]):
        acc = acc + a[:, j, None] * b[None, :, j]
    return acc


def emulated_dot(x: torch.Tensor, e: torch.Tensor, precision: str, split: str = "rna",
                 small: str = "truncate") -> torch.Tensor:
    """(N, K) float32 x·eᵀ as the searches' tl.dot computes it at ``precision``, slice by slice."""
    total = torch.zeros(x.shape[0], e.shape[0])
    width = slice_width(x.shape[1])
    for d0 in range(0, x.shape[1], width):
        a, b = x[:, d0:d0 + width], e[:, d0:d0 + width]
        zero = torch.zeros_like(total)
        if precision == "ieee":
            part = sequential_dot(a, b, zero)
        elif precision == "tf32":
            part = sequential_dot(to_tf32(a, split), to_tf32(b, split), zero)
        else:
            a_big, b_big = to_tf32(a, split), to_tf32(b, split)
            a_small, b_small = to_tf32(a - a_big, small), to_tf32(b - b_big, small)
            part = sequential_dot(a_small, b_big, zero)
            part = sequential_dot(a_big, b_small, part)
            part = sequential_dot(a_big, b_big, part)
        total = total + part
    return total


def emulated_search(x: torch.Tensor, codebook: torch.Tensor, precision: str, **modes):
    """(indices, x', e'): the emulated search's choice, and the float32 centred operands it searched."""
    centre = search_centre(codebook)
    x_c, e_c = x - centre, codebook - centre
    norms = e_c.square().sum(1)
    xe = emulated_dot(x_c, e_c, precision, **modes)
    score = (norms.double() - 2 * xe.double()).float()  # tl.fma(xe, -2, norms): one rounding
    return score.argmin(1), x_c, e_c  # argmin: the first minimal index


def adversarial(dim: int, offset: float, seed: int, num_codes: int = 64, pairs: int = 384):
    """Codes with per-dimension scales over 10^±3, half of them near-copies of the other half (relative
    gaps 1e-7..1e-2); rows at near-ties between two codes, or next to a code and its near-copy; all
    shifted by a common ``offset``."""
    g = torch.Generator().manual_seed(seed)
    scales = 10 ** (6 * torch.rand(dim, generator=g, dtype=torch.float64) - 3)
    base = torch.randn(num_codes // 2, dim, generator=g, dtype=torch.float64) * scales
    gaps = 10 ** (-7 + 5 * torch.rand(num_codes // 2, 1, generator=g, dtype=torch.float64))
    copies = base + gaps * torch.randn(num_codes // 2, dim, generator=g, dtype=torch.float64) * scales
    codebook = torch.cat([base, copies])
    a = torch.randint(0, num_codes, (pairs,), generator=g)
    b = torch.randint(0, num_codes, (pairs,), generator=g)
    b = torch.where(torch.rand(pairs, generator=g) < 0.5, (a + num_codes // 2) % num_codes, b)
    tilt = 10 ** (-9 + 7 * torch.rand(pairs, 1, generator=g, dtype=torch.float64))
    tilt = tilt * torch.sign(torch.randn(pairs, 1, generator=g, dtype=torch.float64))
    x = (codebook[a] + codebook[b]) / 2 + tilt * (codebook[a] - codebook[b])
    jitter = 1e-3 * torch.randn(pairs, dim, generator=g, dtype=torch.float64) * scales
    x = x + jitter * (torch.rand(pairs, 1, generator=g) < 0.25)  # a quarter of the rows off the tie
    return (x + offset).float(), (codebook + offset).float()


def excess(x_c: torch.Tensor, e_c: torch.Tensor, indices: torch.Tensor, precision: str) -> torch.Tensor:
    """The judge, in the frame the search ran in, on the operands it multiplied (the tightest slack)."""
    return reference.nearest_code_excess(x_c.double(), e_c.double(), indices, precision=precision)


CASES = [(dim, offset) for dim in (1, 3, 33, 257) for offset in (0.0, 1e4, 3e6)]


@pytest.mark.parametrize("dim,offset", CASES)
def test_tf32x3_search_passes_its_slack_and_tf32_does_not(dim, offset):
    worst = {}
    for seed in range(2):
        x, codebook = adversarial(dim, offset, seed)
        for precision, modes in (("ieee", {}), ("tf32x3", {}), ("tf32x3", {"split": "rne", "small": "rne"}),
                                 ("tf32x3", {"split": "rna", "small": "rna"}), ("tf32", {})):
            indices, x_c, e_c = emulated_search(x, codebook, precision, **modes)
            for judged_at in {precision, "tf32x3"}:
                key = (precision, judged_at, tuple(modes.values()))
                worst[key] = max(worst.get(key, 0.0), float(excess(x_c, e_c, indices, judged_at).max()))
    for (precision, judged_at, modes), value in worst.items():
        if precision == judged_at:
            assert value <= 1.0, f"{precision} {modes}: excess {value:.3g} over its own slack"
    # The data must be able to fail the tf32x3 slack: one TF32 product errs ~2^-10 relative.
    if offset == 0.0:
        assert worst[("tf32", "tf32x3", ())] > 1.0, worst


@pytest.mark.parametrize("dim", (1, 3, 33, 257))
def test_tf32x3_dot_error_within_the_derived_bound(dim):
    # nearest_code_slack's derivation: x·e at tf32x3 errs by at most (2.2d + 23)·u·Σ|x_j e_j|; one TF32
    # product, by up to ~2^-10 relative, exceeds that on this data.
    x, codebook = adversarial(dim, 0.0, seed=5)
    exact = x.double() @ codebook.double().T
    size = x.double().abs() @ codebook.double().abs().T * 2.0**-24
    bound = 2.2 * dim + 23
    for modes in ({}, {"split": "rne", "small": "rne"}, {"split": "rna", "small": "rna"}):
        error = (emulated_dot(x, codebook, "tf32x3", **modes).double() - exact).abs() / size
        assert float(error.max()) <= bound, (modes, float(error.max()))
    assert float(((emulated_dot(x, codebook, "tf32").double() - exact).abs() / size).max()) > bound


def test_tf32_split_of_small_integers_is_exact():
    # |v| < 2^11 has at most 11 significant bits: its TF32 big part is v, its small part 0, so tf32x3
    # multiplies exactly and integer data keep exact scores (the exact-index tests stay exact).
    values = torch.arange(-2047, 2048, dtype=torch.float32)
    for mode in ("rna", "rne"):
        assert torch.equal(to_tf32(values, mode), values)
    g = torch.Generator().manual_seed(0)
    codebook = small_integers(200, 33, generator=g)
    x = small_integers(300, 33, generator=g)
    indices, _, _ = emulated_search(x, codebook, "tf32x3")
    expected, _ = reference.nearest_code(x.double(), codebook.double())
    assert torch.equal(indices, expected)


def test_the_kernels_tf32_split_of_the_codes_is_the_emulated_one():
    # nearest_code.tf32_split_codes (what the resident-x searches load at "tf32x3") is E = tf32(e) by cvt.rna
    # and ε = tf32(e − E) by cvt.rna, each row E then ε.
    from fastvq.triton.nearest_code import tf32_split_codes

    codes = adversarial(33, 0.0, seed=1)[1]
    split = tf32_split_codes(codes)
    big, small = to_tf32(codes, "rna"), to_tf32(codes - to_tf32(codes, "rna"), "rna")
    assert split.shape == (64, 66) and torch.equal(split[:, :33], big) and torch.equal(split[:, 33:], small)
    assert torch.equal(to_tf32(small, "truncate"), small)  # both parts are TF32: nothing for the cores to drop
    assert bool(((big.double() + small.double() - codes.double()).abs() <= 2.0**-22 * codes.double().abs()).all())


def test_to_tf32_rounds_as_documented():
    one = torch.tensor([1.0])
    ulp = 2.0**-10  # of TF32 at 1
    half = one + ulp / 2  # a tie
    assert to_tf32(half, "rna").item() == 1 + ulp and to_tf32(half, "rne").item() == 1.0
    assert to_tf32(-half, "rna").item() == -(1 + ulp)
    assert to_tf32(one + ulp * 0.75, "truncate").item() == 1.0


def test_slack_terms_keep_the_default_and_name_bad_precisions():
    x, codebook = torch.randn(5, 7), torch.randn(3, 7)
    scale = (x.double() ** 2).sum(1) + 2 * (codebook.double() ** 2).sum(1).max()
    assert torch.equal(reference.nearest_code_slack(x, codebook), 2 * 9 * 2.0**-24 * scale)
    assert reference.slack_terms(7) == 9
    assert reference.slack_terms(7, "tf32x3") == 3 * 7 + 26
    assert reference.slack_terms(7, "tf32") == 3 * 7 + 26 + 2**14
    for call in (lambda: reference.nearest_code_slack(x, codebook, "fp32"),
                 lambda: reference.assert_nearest(x, codebook, torch.zeros(5, dtype=torch.int64), "x" * 200)):
        with pytest.raises(ValueError, match="precision must be one of"):
            call()
