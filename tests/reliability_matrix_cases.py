"""The reliability matrix's table and inputs (issue 12), for tests/test_reliability_matrix.py: the targets, the
stated verdict per (target, case) with its legend, the README's rendering of them, and each case's problems
(rows and codebook on the CPU, with what the judge needs to know of them).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

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
