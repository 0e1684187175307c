"""The reliability matrix (issue 12): every public function and module, the same input cases, one
stated verdict per (target, case), checked against fastvq/reference.py on every (backend, device) pair.

VERDICTS is the table. A cell is one or more parts joined by " + ", each a check below whose meaning
is its LEGEND line. The README's "Correctness and reliability" section prints the table and legend as
matrix_markdown() writes them (test_readme_states_the_matrix). fastvq.functional's functions are
fastvq's top-level ones, so their columns cover both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import fastvq
from fastvq import FastVectorQuantizer, ResidualVQ, reference

from conftest import TOLERANCES, assert_within_summation_bound, chosen_sqdist, skip_on_interpreter, to_cpu

TARGETS = ("nearest_code", "nearest_codes", "quantize", "ema_stats", "kmeans", "FastVectorQuantizer train",
           "FastVectorQuantizer eval", "ResidualVQ train", "ResidualVQ eval")
KERNEL_DTYPE_TARGETS = ("nearest_code", "nearest_codes", "quantize", "ema_stats")  # also bfloat16 and float16
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLOAT32_ONLY_CASES = ("huge", "beyond", "tiny", "offset")  # values half precision cannot hold

LEGEND = {
    "oracle": "indices and sqdist equal `reference.nearest_code` (`nearest_codes`, k = min(3, K)) on the float64 "
              "inputs (ties to the lowest index), sqdist rounded to float32; quantized = codebook[indices]. ema_stats: "
              "counts equal the oracle's, sums its float64 ones rounded to float32, NaN and Inf included (huge: within "
              "the float32 summation bound)",
    "nearest": "every index is a nearest code by the float64 judge `reference.assert_nearest` (`assert_nearest_k`), "
               "applied to x − c and codebook − c (c: the offset, so the slack is the centred data's); sqdist within "
               "TOLERANCES['sqdist']",
    "finite rows": "rows without NaN/Inf: `oracle`; rows with one: index 0 (at every level; `nearest_codes`: "
                   "0, …, k − 1), non-finite sqdist, quantized = codebook[0]",
    "never chosen": "`oracle` on the finite codes: a code with a NaN/Inf is never chosen; with no finite code every "
                    "row gets index 0 (`nearest_codes`: 0, …, k − 1)",
    "own code only": "a row with NaN/Inf makes only the sums of its own code non-finite",
    "left out": "the finite rows get exactly the result they get without the bad rows, which get index 0",
    "scaled": "x·2^-60 gives 2^-60 × the centroids of x and the same assignments, bitwise",
    "distinct rows": "k = the number of distinct rows: the centroids are those rows, every row assigned to its own",
    "mean": "k = 1: the centroid is the mean of x, every assignment 0",
    "empty": "outputs with 0 rows, of the right shapes and dtypes (a module's loss is 0)",
    "ValueError": "a ValueError whose message starts with the argument after the colon (ema_stats and kmeans: in "
                  "float64 too)",
    "as contiguous": "bitwise the result for contiguous copies of the inputs",
    "EMA step": "the codebook state after the step is `reference.ema_update`'s from the step's rows and "
                "indices, within the float32 tolerance, NaN/Inf exactly where the oracle has them",
    "n/a": "the case does not apply (the reason follows)",
}

_S, _M, _C = "oracle", "nearest", " + as contiguous"


def _row(search, quantize, ema_stats, kmeans, module=None):
    """One case's verdicts: nearest_code's and nearest_codes' are ``search``, the modules' ``module``
    (``quantize`` when None), and a module's train cell adds the EMA step to its eval cell."""
    module = quantize if module is None else module
    ema = "" if module.startswith(("ValueError", "n/a")) else " + EMA step"
    return {"nearest_code": search, "nearest_codes": search, "quantize": quantize, "ema_stats": ema_stats,
            "kmeans": kmeans, "FastVectorQuantizer train": module + ema, "FastVectorQuantizer eval": module,
            "ResidualVQ train": module + ema, "ResidualVQ eval": module}


_NO_CODEBOOK = "n/a: no codebook"
_ROWS_ONLY = "n/a: (N, d) rows only; see strided"
VERDICTS = {
    "NaN, ±Inf in x": _row("finite rows", "finite rows", "oracle + own code only", "left out"),
    "NaN, ±Inf in codebook": _row("never chosen", "never chosen", _NO_CODEBOOK, _NO_CODEBOOK),
    "huge (1e19)": _row(_M, _M, _S, _M),
    "beyond float32 (2^62)": _row("ValueError: codebook", "ValueError: codebook", _S, "ValueError: x"),
    "tiny (2^-60)": _row(_S, _S, _S, "scaled"),
    "offset (1e3, 1e4)": _row(_M, _M, _S, _M),
    "exact ties": _row(_S, _S, "n/a: no search", "distinct rows"),
    "N = 0": _row("empty", "empty", _S, "ValueError: x"),
    "K = 1": _row(_S, _S, _S, "mean"),
    "d = 1": _row(_S, _S, _S, _M),
    "d = 0": _row("ValueError: codebook", "ValueError: codebook", "ValueError: x", "ValueError: x", "ValueError: dim"),
    "strided": _row(_S + _C, _S + _C, _S + _C, "as contiguous"),
    "expanded": _row(_S + _C, _S + _C, _S + _C, "as contiguous"),
    "channels-last": _row(_ROWS_ONLY, _S + _C, _ROWS_ONLY, _ROWS_ONLY),
}
CASES = tuple(VERDICTS)
CASE_INPUTS = {
    "NaN, ±Inf in x": "each, in the first column, the last, a run and all of four rows of x (N = 7 and 37; k-means: "
                      "N = 600)",
    "NaN, ±Inf in codebook": "each, in the first and last codes and two inside (K = 45) with rows of x next to them; "
                             "and no finite code at all",
    "huge (1e19)": "1e19 + 1e15·N(0, 1), N = 300, K = 64, d = 16: ‖x‖² and ‖e‖² beyond float32's range (3.4e38), "
                   "the distances within it",
    "beyond float32 (2^62)": "small integers × 2^62: the codes' distances from their centre beyond the float32 "
                             "search's range (‖v − c‖² <= FLT_MAX/8)",
    "tiny (2^-60)": "small integers × 2^-60",
    "offset (1e3, 1e4)": "1e3 or 1e4 + N(0, 1), N = 300, K = 64, d = 16",
    "exact ties": "duplicate codes, rows equal to a code, rows exactly halfway between two codes",
    "strided": "x a column slice with step 2 of a wider tensor, the codebook a transposed one",
    "expanded": "stride-0 columns in x and the codebook; one row of x expanded to N (ema_stats: expanded indices)",
    "channels-last": "quantize: x (1, 4, 9, d) in channels_last memory; modules: an image (1, d, 4, 9) in "
                     "channels_last memory with accept_image_fmap=True",
}

# Cells that fail today on the named backends, and why: strict xfails, so a fix fails the run until
# its entry goes.
KNOWN_FAILURES: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {}


def matrix_markdown() -> str:
    """The table and legend the README prints; † marks a cell that fails today (a strict xfail)."""
    dtypes = ", ".join(str(dtype).removeprefix("torch.") for dtype in DTYPES)
    float32_only = ", ".join(case for case in CASES if case.startswith(FLOAT32_ONLY_CASES))
    lines = [f"{', '.join(KERNEL_DTYPE_TARGETS)} run in {dtypes} ({float32_only}: float32 only), the rest in float32.",
             "", "| case | " + " | ".join(TARGETS) + " |", "|---" * (len(TARGETS) + 1) + "|"]
    lines += [f"| {case} | " + " | ".join(VERDICTS[case][t] + " †" * ((t, case) in KNOWN_FAILURES) for t in TARGETS)
              + " |" for case in CASES]
    lines += ["", "Inputs (the rest: small integers in [-4, 4], N = 37, K = 45, d = 19, but for the named size):"]
    lines += [f"- **{case}**: {inputs}." for case, inputs in CASE_INPUTS.items()]
    lines += ["", "Verdicts:"] + [f"- **{part}**: {meaning}." for part, meaning in LEGEND.items()]
    grouped = {}
    for (target, case), (backends, reason) in KNOWN_FAILURES.items():
        cases, targets = grouped.setdefault((backends, reason), ({}, {}))
        cases[case], targets[target] = None, None
    lines += [f"- **†** fails today on {'/'.join(backends)} ({', '.join(cases)}; {', '.join(targets)}): {reason}."
              for (backends, reason), (cases, targets) in grouped.items()]
    return "\n".join(lines)


def test_readme_states_the_matrix():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert matrix_markdown() in readme, "README's matrix differs from VERDICTS; paste matrix_markdown() there"


def test_every_part_of_every_cell_is_in_the_legend():
    parts = {part.split(":")[0] for row in VERDICTS.values() for cell in row.values() for part in cell.split(" + ")}
    assert parts <= set(LEGEND), parts - set(LEGEND)


# ---- the cases' inputs -----------------------------------------------------------------------
@dataclass
class Problem:
    """Rows x (N, d) and codebook (K, d) on the CPU, in the case's layout, with what the judge needs."""
    x: torch.Tensor
    codebook: torch.Tensor
    bad_rows: list[int] = field(default_factory=list)
    bad_codes: list[int] = field(default_factory=list)
    centre: float = 0.0  # the judge works in the frame x − centre
    image: tuple[int, int] | None = None  # (H, W): channels-last image of these rows


NON_FINITE = (float("nan"), float("inf"), float("-inf"))


def integers(*shape, seed, low=-4, high=5) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed)).float()


def exact_problem(dtype, num_rows=37, num_codes=45, dim=19, seed=0) -> Problem:
    """Small integers, every distance exact; when K > 2 codes 0 and 1 repeat later (the later copy must
    never win), and every other row of x is a code (distance 0)."""
    x, codebook = integers(num_rows, dim, seed=seed), integers(num_codes, dim, seed=seed + 1)
    if num_codes > 2:
        codebook[num_codes // 2], codebook[-1] = codebook[1], codebook[0]
    x[::2] = codebook[torch.randint(0, num_codes, (len(x[::2]),), generator=torch.Generator().manual_seed(seed))]
    return Problem(x.to(dtype), codebook.to(dtype))


def bad_x_problems(dtype, bad: float) -> list[Problem]:
    """NaN/Inf in the first column, the last, a run and every entry of four rows; one panel and several."""
    problems = []
    for num_rows, num_codes, dim in ((7, 4, 2), (37, 45, 19)):
        problem = exact_problem(torch.float32, num_rows, num_codes, dim)
        x, codebook = problem.x, problem.codebook
        codebook[0] = 0  # code 0 is not an extreme one, so "index 0" can't happen by chance
        codebook[1:, 0] = torch.tensor([-3.0, 3.0]).repeat(num_codes)[: num_codes - 1]  # both signs
        x[0, 0], x[1, -1], x[num_rows // 2, dim // 2:], x[-1] = bad, bad, bad, bad
        problems.append(Problem(x.to(dtype), codebook.to(dtype), bad_rows=[0, 1, num_rows // 2, num_rows - 1]))
    return problems


def bad_codebook_problems(dtype, bad: float) -> list[Problem]:
    """NaN/Inf in the first and last codes and two inside, x next to them; then every code bad."""
    problem = exact_problem(torch.float32)
    x, codebook = problem.x, problem.codebook
    codebook[0, 0], codebook[3, -1], codebook[20], codebook[44, 2:9] = bad, bad, bad, bad
    x[:4] = codebook[[1, 2, 3, 4]].nan_to_num(posinf=4, neginf=-4, nan=0)  # rows next to the bad codes
    all_bad = exact_problem(torch.float32, 9, 5, 3)
    all_bad.codebook[:, 1] = bad
    all_bad.x[4] = float("nan")  # and a bad row of x as well
    return [Problem(x.to(dtype), codebook.to(dtype), bad_codes=[0, 3, 20, 44]),
            Problem(all_bad.x.to(dtype), all_bad.codebook.to(dtype), bad_codes=list(range(5)), bad_rows=[4])]


def offset_problem(offset: float, spread: float = 1.0) -> Problem:
    """The finding's data: a constant offset plus spread·N(0, 1), d = 16."""
    generator = torch.Generator().manual_seed(5)
    return Problem(offset + spread * torch.randn(300, 16, generator=generator),
                   offset + spread * torch.randn(64, 16, generator=generator), centre=offset)


def ties_problem(dtype) -> Problem:
    """Duplicate codes, rows equal to a code, and rows exactly halfway between two codes."""
    problem = exact_problem(torch.float32)
    x, codebook = problem.x, 2 * problem.codebook  # even integers: midpoints are integers
    x[::2] *= 2
    pairs = torch.randint(0, len(codebook), (len(x[1::4]), 2), generator=torch.Generator().manual_seed(6))
    x[1::4] = (codebook[pairs[:, 0]] + codebook[pairs[:, 1]]) / 2
    return Problem(x.to(dtype), codebook.to(dtype))


def strided_problem(dtype) -> Problem:
    """x a column slice with a step of a wider tensor, the codebook a transposed one."""
    problem = exact_problem(dtype)
    x = torch.full((37, 2 * 19 + 1), 7.0, dtype=dtype)
    x[:, 1::2] = problem.x
    return Problem(x[:, 1::2], problem.codebook.t().contiguous().t())


def expanded_problems(dtype) -> list[Problem]:
    """Stride-0 columns in x and the codebook (many equal codes), then one row of x expanded."""
    return [Problem(integers(37, 1, seed=7).expand(37, 19).to(dtype), integers(45, 1, seed=8).expand(45, 19).to(dtype)),
            Problem(integers(1, 19, seed=9).expand(37, 19).to(dtype), integers(45, 19, seed=10).to(dtype))]


def problems(case: str, dtype) -> list[Problem]:
    if case.endswith(" in x"):
        return [problem for bad in NON_FINITE for problem in bad_x_problems(dtype, bad)]
    if case.endswith(" in codebook"):
        return [problem for bad in NON_FINITE for problem in bad_codebook_problems(dtype, bad)]
    if case.startswith(("beyond", "tiny")):
        problem = exact_problem(dtype)
        scale = 2.0 ** (62 if case.startswith("beyond") else -60)
        return [Problem(problem.x * scale, problem.codebook * scale)]
    if case.startswith("offset"):
        return [offset_problem(1e3), offset_problem(1e4)]
    if case.startswith("huge"):
        return [offset_problem(1e19, spread=1e15)]
    if case == "exact ties":
        return [ties_problem(dtype)]
    sizes = {"N = 0": (0, 45, 19), "K = 1": (37, 1, 19), "d = 1": (37, 45, 1), "d = 0": (5, 3, 0)}
    if case in sizes:
        return [exact_problem(dtype, *sizes[case])]
    if case == "strided":
        return [strided_problem(dtype)]
    if case == "expanded":
        return expanded_problems(dtype)
    if case == "channels-last":
        problem = exact_problem(dtype, 36)
        return [Problem(problem.x, problem.codebook, image=(4, 9))]
    raise AssertionError(case)


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


def check_nearest(level: Level, centre: float) -> None:
    x, codebook = level.x.double() - centre, level.codebook.double() - centre
    (reference.assert_nearest if level.indices.dim() == 1 else reference.assert_nearest_k)(x, codebook, level.indices)
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
                check_nearest(level, problem.centre if level is outcome.levels[0] else 0.0)
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
            check_nearest(Level(problem.x, centroids, assignments), problem.centre)
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
