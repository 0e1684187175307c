"""The reliability matrix (issue 12): every public function and module, the same input cases, one
stated verdict per (target, case), checked against fastvq/reference.py on every (backend, device) pair.

VERDICTS (tests/reliability_matrix_cases.py, with the cases' inputs) is the table. A cell is one or
more parts joined by " + ", each a check below whose meaning is its LEGEND line. The README's "Correctness and reliability" section prints the table and legend as
matrix_markdown() writes them (test_readme_states_the_matrix). fastvq.functional's functions are
fastvq's top-level ones, so their columns cover both.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import fastvq
from fastvq import FastVectorQuantizer, ResidualVQ, reference

from conftest import TOLERANCES, assert_within_summation_bound, chosen_sqdist, skip_on_interpreter, to_cpu
from reliability_matrix_cases import (CASES, DTYPES, FLOAT32_ONLY_CASES, KERNEL_DTYPE_TARGETS, KNOWN_FAILURES, LEGEND,
                                      NON_FINITE, TARGETS, VERDICTS, Problem, integers, matrix_markdown, problems,
                                      strided_problem)


def test_readme_states_the_matrix():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert matrix_markdown() in readme, "README's matrix differs from VERDICTS; paste matrix_markdown() there"


def test_every_part_of_every_cell_is_in_the_legend():
    parts = {part.split(":")[0] for row in VERDICTS.values() for cell in row.values() for part in cell.split(" + ")}
    assert parts <= set(LEGEND), parts - set(LEGEND)

# ---- running a target on a problem -----------------------------------------------------------
@dataclass
class Level:
    """One search's inputs and results on the CPU: rows (N, d), codebook (K, d), indices (N,)."""
    x: torch.Tensor
    codebook: torch.Tensor
    indices: torch.Tensor
    sqdist: torch.Tensor | None = None
    quantized: torch.Tensor | None = None  # rows (N, d)
    state_before: tuple | None = None  # (embed, cluster_size, embed_avg) of a module in train mode
    state_after: tuple | None = None


@dataclass
class Outcome:
    levels: list[Level]
    total: torch.Tensor | None = None  # ResidualVQ's quantized rows


def image_of(rows: torch.Tensor, image) -> torch.Tensor:
    """(1, d, H, W) in channels-last memory from rows (H·W, d) in (h, w) order."""
    height, width = image
    result = rows.reshape(1, height, width, rows.shape[1]).permute(0, 3, 1, 2)
    assert result.is_contiguous(memory_format=torch.channels_last)
    return result


def run_search(target: str, pair, problem: Problem, contiguous: bool = False) -> Outcome:
    x, codebook = problem.x, problem.codebook
    if contiguous:
        x, codebook = x.contiguous(), codebook.contiguous()
    if target == "nearest_code":
        indices, sqdist = to_cpu(*fastvq.nearest_code(*pair.to(x, codebook), backend=pair.backend))
        return Outcome([Level(x, codebook, indices, sqdist)])
    if target == "nearest_codes":
        if x.shape[1]:  # (d = 0 must raise its ValueError first)
            pair.require(*pair.to(x, codebook), op="nearest_codes")
        k = min(3, len(codebook))
        indices, sqdist = to_cpu(*fastvq.functional.nearest_codes(*pair.to(x, codebook), k, backend=pair.backend))
        return Outcome([Level(x, codebook, indices, sqdist)])
    if target == "quantize":
        inputs = x
        if problem.image is not None:  # (1, C, H, d) in channels-last memory: stride C along d
            inputs = x.reshape(1, *problem.image, x.shape[1]).contiguous(memory_format=torch.channels_last)
            assert inputs.stride(-1) == problem.image[0]
        if contiguous:
            inputs = inputs.contiguous()
        quantized, indices = to_cpu(*fastvq.quantize(*pair.to(inputs, codebook), backend=pair.backend))
        assert quantized.shape == inputs.shape and indices.shape == inputs.shape[:-1]
        return Outcome([Level(x, codebook, indices.reshape(-1), None, quantized.reshape(x.shape))])
    return run_module(target, pair, problem, contiguous)


def run_module(target: str, pair, problem: Problem, contiguous: bool) -> Outcome:
    x, codebook = problem.x, problem.codebook
    residual = target.startswith("ResidualVQ")
    kwargs = {"rotation_trick": False, "backend": pair.backend, "accept_image_fmap": problem.image is not None}
    module = ResidualVQ(x.shape[1], len(codebook), 2, **kwargs) if residual else FastVectorQuantizer(
        x.shape[1], len(codebook), **kwargs)
    module.train(target.endswith("train")).to(pair.device)
    layers = list(module.layers) if residual else [module]
    # Level 0 searches x; later levels search residuals, near 0, so their codebook is centred there.
    codebooks = [codebook.float()] + [codebook.float() - problem.centre] * (len(layers) - 1)
    for layer, codes in zip(layers, codebooks):
        layer.set_codebook(pair.to(codes))
    inputs = x.unsqueeze(0) if problem.image is None else image_of(x, problem.image)
    if contiguous:
        inputs = inputs.contiguous()
    inputs = pair.to(inputs).detach().requires_grad_(module.training)
    state = lambda layer: tuple(getattr(layer._codebook, n)[0].detach().cpu().clone()
                                for n in ("embed", "cluster_size", "embed_avg"))
    before = [state(layer) for layer in layers]
    quantized, indices, loss = to_cpu(*module(inputs))
    after = [state(layer) for layer in layers]
    if x.shape[0] == 0:
        assert float(loss.sum()) == 0.0 and loss.dtype == torch.float32
    quantized = quantized.reshape(-1, x.shape[1]) if problem.image is None else quantized[0].permute(1, 2, 0).reshape(
        -1, x.shape[1])
    indices = indices.reshape(-1, len(layers))
    rows, levels = x.float(), []
    for level, layer in enumerate(layers):
        train = module.training
        levels.append(Level(rows, codebooks[level], indices[:, level], None, None if residual else quantized,
                            before[level] if train else None, after[level] if train else None))
        if not train:  # eval leaves the state alone
            for a, b in zip(before[level], after[level]):
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        rows = rows - codebooks[level][indices[:, level]]  # what the next level searches
    return Outcome(levels, quantized if residual else None)


# ---- the verdicts' parts ---------------------------------------------------------------------
def first_codes(level: Level) -> torch.Tensor:
    """What a row whose every distance is non-finite gets: 0, or 0, ..., k − 1 for nearest_codes."""
    return torch.tensor(0) if level.indices.dim() == 1 else torch.arange(level.indices.shape[1])


def check_oracle(level: Level, finite_codes=None) -> None:
    x, codebook = level.x, level.codebook
    codes = torch.arange(len(codebook)) if finite_codes is None else finite_codes
    x64, e64 = x.double(), codebook[codes].double()
    want_indices, want_sqdist = (reference.nearest_code(x64, e64) if level.indices.dim() == 1
                                 else reference.nearest_codes(x64, e64, level.indices.shape[1]))
    torch.testing.assert_close(level.indices, codes[want_indices], rtol=0, atol=0)
    if level.sqdist is not None:
        assert level.sqdist.dtype == torch.float32
        torch.testing.assert_close(level.sqdist, want_sqdist.float(), rtol=0, atol=0)
    if level.quantized is not None:
        torch.testing.assert_close(level.quantized, codebook[level.indices].to(level.quantized.dtype), rtol=0, atol=0)


def check_nearest(level: Level, centre: float, pair) -> None:
    x, codebook = level.x.double() - centre, level.codebook.double() - centre
    judge = reference.assert_nearest if level.indices.dim() == 1 else reference.assert_nearest_k
    judge(x, codebook, level.indices, pair.precision(level.x, level.codebook))
    if level.sqdist is not None:
        chosen = ((x.unsqueeze(-2) - codebook[level.indices]) ** 2).sum(-1) if level.indices.dim() == 2 else (
            chosen_sqdist(x, codebook, level.indices))
        torch.testing.assert_close(level.sqdist.double(), chosen, **TOLERANCES["sqdist"])


def check_finite_rows(level: Level, bad_rows: list[int]) -> None:
    good = torch.isfinite(level.x).all(1)
    assert sorted(torch.nonzero(~good).squeeze(1).tolist()) == sorted(bad_rows)
    check_oracle(Level(level.x[good], level.codebook, level.indices[good],
                       None if level.sqdist is None else level.sqdist[good],
                       None if level.quantized is None else level.quantized[good]))
    assert bool((level.indices[~good] == first_codes(level)).all()), f"bad rows got {level.indices[~good].tolist()}"
    if level.sqdist is not None:
        assert not torch.isfinite(level.sqdist[~good]).any(), f"bad rows got sqdist {level.sqdist[~good]}"
    if level.quantized is not None:
        torch.testing.assert_close(level.quantized[~good], level.codebook[[0] * len(bad_rows)], rtol=0, atol=0)


def check_never_chosen(level: Level, bad_codes: list[int]) -> None:
    finite_codes = torch.tensor([k for k in range(len(level.codebook)) if k not in bad_codes], dtype=torch.int64)
    chosen_bad = sorted(set(level.indices.flatten().tolist()) & set(bad_codes))
    if len(finite_codes) == 0:  # no finite code: every row gets 0 (0, ..., k − 1), whose distance is not finite
        assert bool((level.indices == first_codes(level)).all()), level.indices.tolist()
        assert level.sqdist is None or not torch.isfinite(level.sqdist).any()
        return
    assert not chosen_bad, f"non-finite codebook rows {chosen_bad} were chosen"
    check_oracle(level, finite_codes)


def check_ema_step(level: Level, decay: float = 0.8, eps: float = 1e-5) -> None:
    embed, cluster_size, embed_avg = (t.clone() for t in level.state_before)
    counts, sums = reference.ema_stats(level.x.double(), level.indices, len(level.codebook))
    reference.ema_update(embed, cluster_size, embed_avg, counts, sums, decay, eps)
    for name, got, want in zip(("embed", "cluster_size", "embed_avg"), level.state_after,
                               (embed, cluster_size, embed_avg)):
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite), f"{name}: non-finite at other places than the oracle's"
        scale = max(1.0, float(want[finite].abs().max())) if bool(finite.any()) else 1.0
        tolerance = TOLERANCES[torch.float32]
        torch.testing.assert_close(got, want, rtol=tolerance["rtol"], atol=tolerance["atol"] * scale, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")


def check_search_cell(target: str, cell: str, pair, problem: Problem) -> None:
    parts = cell.split(" + ")
    if parts[0].startswith("ValueError"):
        name = parts[0].split(": ")[1]
        with pytest.raises(ValueError, match=rf"^{name} "):
            run_search(target, pair, problem)
        return
    outcome = run_search(target, pair, problem)
    for level in outcome.levels:
        for part in parts:
            if part == "oracle":
                check_oracle(level)
            elif part == "nearest":
                check_nearest(level, problem.centre if level is outcome.levels[0] else 0.0, pair)
            elif part == "finite rows":
                check_finite_rows(level, problem.bad_rows)
            elif part == "never chosen":
                check_never_chosen(level, problem.bad_codes)
            elif part == "empty":
                shape = (0, *level.indices.shape[1:])
                assert level.indices.shape == shape and level.indices.dtype == torch.int64
                assert level.sqdist is None or (level.sqdist.shape == shape and level.sqdist.dtype == torch.float32)
                assert level.quantized is None or level.quantized.shape == (0, level.x.shape[1])
            elif part == "EMA step":
                check_ema_step(level)
            elif part != "as contiguous":
                raise AssertionError(f"no check for {part!r}")
    if outcome.total is not None:  # ResidualVQ's quantized: the sum of the levels' codes
        want = sum(level.codebook[level.indices] for level in outcome.levels)
        torch.testing.assert_close(outcome.total, want.to(outcome.total.dtype), rtol=0, atol=0, equal_nan=True)
    if "as contiguous" in parts:
        copy = run_search(target, pair, problem, contiguous=True)
        for level, copied in zip(outcome.levels, copy.levels):
            for got, want in [(level.indices, copied.indices), (level.sqdist, copied.sqdist),
                              (level.quantized, copied.quantized), *zip(level.state_after or (), copied.state_after or ())]:
                assert got is None or torch.equal(got, want), "differs from the contiguous copy's"


# ---- the cells -------------------------------------------------------------------------------
def cells():
    for case in CASES:
        for target in TARGETS:
            if VERDICTS[case][target].startswith("n/a"):
                continue
            half_too = target in KERNEL_DTYPE_TARGETS and not case.startswith(FLOAT32_ONLY_CASES)
            for dtype in DTYPES if half_too else DTYPES[:1]:
                yield pytest.param(target, case, dtype,
                                   id=f"{target.replace(' ', '-')}-{case}-{str(dtype).removeprefix('torch.')}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("target,case,dtype", list(cells()))
def test_cell(request, pair, target, case, dtype):
    pair.require(torch.empty(1, 1, dtype=dtype, device=pair.device))
    backends, reason = KNOWN_FAILURES.get((target, case), ((), ""))
    if pair.backend in backends:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    cell = VERDICTS[case][target]
    if pair.interpreted and (target == "nearest_codes" or (dtype != torch.float32 and " in " not in case)):
        pytest.skip("Triton's interpreter runs the top-k kernel (test_nearest_codes.py's cases) and half precision "
                    "(but for NaN/Inf) too slowly for the whole matrix")
    if target == "ema_stats":
        check_ema_stats_cell(cell, pair, case, dtype)
    elif target == "kmeans":
        skip_on_interpreter(pair, "k-means runs 11 searches")
        check_kmeans_cell(cell, pair, case)
    else:
        for problem in problems(case, dtype):
            check_search_cell(target, cell, pair, problem)


def check_ema_stats_cell(cell: str, pair, case: str, dtype) -> None:
    parts = cell.split(" + ")
    for number, problem in enumerate(problems(case, dtype)):
        x = problem.x.round() if case.startswith("offset") else problem.x  # integers near the offset: exact sums
        num_codes = len(problem.codebook)
        indices = torch.randint(0, num_codes, (x.shape[0],), generator=torch.Generator().manual_seed(number))
        if case == "expanded":
            indices = indices[:1].expand(x.shape[0])

        def run(x, indices, num_codes=num_codes):
            return to_cpu(*fastvq.ema_stats(*pair.to(x, indices), num_codes, backend=pair.backend))

        if parts[0].startswith("ValueError"):
            for x_in_dtype in (x, x.double()):  # the same error in every dtype
                with pytest.raises(ValueError, match=rf"^{parts[0].split(': ')[1]} "):
                    run(x_in_dtype, indices)
            continue
        counts, sums = run(x, indices)
        want_counts, want_sums = reference.ema_stats(x.double(), indices, num_codes)
        assert counts.dtype == sums.dtype == torch.float32 and sums.shape == (num_codes, x.shape[1])
        torch.testing.assert_close(counts, want_counts.float(), rtol=0, atol=0)
        if case.startswith("huge"):  # sums of 1e19-sized floats: within the float32 summation bound of any order
            assert_within_summation_bound(sums, x, indices, num_codes)
        else:  # integers (times a power of two): every order sums exactly
            torch.testing.assert_close(sums, want_sums.float(), rtol=0, atol=0, equal_nan=True)
        if "own code only" in parts:
            touched = torch.zeros(num_codes, dtype=torch.bool)
            touched[indices[problem.bad_rows]] = True
            assert bool(torch.isfinite(sums[~touched]).all()) and not bool(torch.isfinite(sums[touched]).all(1).any())
        if "as contiguous" in parts:
            copy = run(x.contiguous(), indices.contiguous())
            assert torch.equal(counts, copy[0]) and torch.equal(sums, copy[1]), "differs from contiguous"


def check_kmeans_cell(cell: str, pair, case: str) -> None:
    def run(x, k):
        return to_cpu(*fastvq.kmeans(pair.to(x), k, seed=0, backend=pair.backend))

    generator = torch.Generator().manual_seed(11)
    if cell == "left out":
        x, bad_rows = torch.randn(600, 8, generator=generator), torch.tensor([0, 5, 100, 599])
        finite = torch.ones(600, dtype=torch.bool).index_fill_(0, bad_rows, False)
        clean_centroids, clean_assignments = run(x[finite], 32)
        for bad in NON_FINITE:
            dirty = x.clone()
            dirty[bad_rows, 3] = bad
            centroids, assignments = run(dirty, 32)
            assert bool(torch.isfinite(centroids).all())
            assert torch.equal(centroids, clean_centroids) and torch.equal(assignments[finite], clean_assignments)
            assert assignments[bad_rows].tolist() == [0, 0, 0, 0]
    elif cell == "scaled":
        x, scale = integers(200, 8, seed=12), 2.0**-60
        centroids, assignments = run(x, 8)
        scaled_centroids, scaled_assignments = run(x * scale, 8)
        assert torch.equal(scaled_centroids, centroids * scale) and torch.equal(scaled_assignments, assignments)
    elif cell == "nearest":
        inputs = problems(case, torch.float32) if case.startswith(("offset", "huge")) else [
            Problem(torch.randn(300, 1, generator=generator), torch.empty(0, 1))]
        for problem in inputs:
            centroids, assignments = run(problem.x, 8)
            check_nearest(Level(problem.x, centroids, assignments), problem.centre, pair)
    elif cell == "distinct rows":
        distinct = torch.tensor([[0.0, 1, 2], [3, -1, 0], [-4, 4, 1], [2, 2, 2]])
        x = distinct.repeat(10, 1)[torch.randperm(40, generator=generator)]
        centroids, assignments = run(x, 4)
        assert torch.equal(centroids[torch.argsort(centroids[:, 0])], distinct[torch.argsort(distinct[:, 0])])
        assert torch.equal(centroids[assignments], x)
    elif cell == "mean":
        x = torch.randn(50, 8, generator=generator)
        centroids, assignments = run(x, 1)
        torch.testing.assert_close(centroids[0].double(), x.double().mean(0), **TOLERANCES[torch.float32])
        assert assignments.tolist() == [0] * 50
    elif cell.startswith("ValueError"):
        x = problems(case, torch.float32)[0].x if case.startswith("beyond") else torch.zeros(
            (0, 8) if case == "N = 0" else (5, 0))
        for dtype in (torch.float32, torch.float64)[: 1 if case.startswith("beyond") else 2]:
            with pytest.raises(ValueError, match=r"^x "):
                run(x.to(dtype), 2)
    elif cell == "as contiguous":
        x = strided_problem(torch.float32).x if case == "strided" else integers(50, 1, seed=13).expand(50, 8)
        result, copy = run(x, 4), run(x.contiguous(), 4)
        assert torch.equal(result[0], copy[0]) and torch.equal(result[1], copy[1]), "differs from contiguous"
    else:
        raise AssertionError(f"no check for {cell!r}")
