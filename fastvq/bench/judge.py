"""Correctness, by fastvq.reference's one judge, before timing (check_output): on an evenly spread subset of rows
(the direct-difference oracle is slow); approximate providers (faiss IVF) get a float64 recall@1 on more rows.
(--check, the device check before any timing, is device_check.py.)"""
import torch
from torch import Tensor

from fastvq import reference
from fastvq.dispatch import get_backend

from .cases import COMMITMENT_WEIGHT, YARDSTICKS, Case, Data

CHECK_ELEMENTS, MIN_ROWS, MAX_ROWS, RECALL_ROWS = 1 << 26, 32, 512, 1024  # the oracle's (rows, K, d) work ~ 2^26


class Wrong(Exception):
    """A provider's answer is wrong; the message says how."""


def spread(n: int, count: int) -> Tensor:
    return torch.linspace(0, n - 1, min(n, count)).round().long().unique() if n else torch.zeros(0, dtype=torch.long)


def check_rows(case: Case, data: Data) -> tuple[Tensor, Tensor | None]:
    """The rows a case's check judges, and the oracle's codes for them (k-means: none; its codebook is its output)."""
    rows = spread(case.n, max(MIN_ROWS, min(MAX_ROWS, CHECK_ELEMENTS // max(1, case.k * case.d))))
    x, codebook = data.x.cpu().float()[rows], data.codebook.cpu().float()
    return rows, None if case.workload == "kmeans" else reference.nearest_code(x, codebook)[0]


def judge_precision(provider: str, data: Data) -> str:
    """The precision (reference.nearest_code_slack) a provider's search is judged at: a fastvq-<backend> provider's
    (or a variant's, fastvq-<backend>-<variant>) backend's search_precision, "ieee" for the others."""
    if not provider.startswith("fastvq-"):
        return "ieee"
    backend = get_backend(provider.removeprefix("fastvq-").split("-")[0])
    return backend.search_precision(data.x.device, data.x.dtype, data.codebook.dtype)


def excess(x: Tensor, codebook: Tensor, indices, rows: Tensor, best: Tensor | None = None,
           precision: str = "ieee") -> Tensor:
    """reference.nearest_code_excess of indices[rows] at ``precision`` (<= 1 passes; best: the oracle's codes);
    Wrong if malformed."""
    indices = torch.as_tensor(indices).reshape(-1)
    if indices.shape != (x.shape[0],) or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise Wrong(f"indices must be an integer tensor of shape ({x.shape[0]},), "
                    f"got {indices.dtype} {tuple(indices.shape)}")
    chosen = indices.detach().cpu().long()[rows]
    if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= codebook.shape[0]):
        raise Wrong(f"indices out of range [0, {codebook.shape[0]}): [{int(chosen.min())}, {int(chosen.max())}]")
    return reference.nearest_code_excess(x.detach().cpu().float()[rows], codebook.detach().cpu().float(), chosen, best,
                                         precision)


def check_nearest(x: Tensor, codebook: Tensor, indices, rows: Tensor, best: Tensor | None = None,
                  precision: str = "ieee") -> None:
    found = excess(x, codebook, indices, rows, best, precision)
    if not bool((found <= 1.0).all()):  # not `> 1`: a NaN is wrong too
        raise Wrong(f"{int((~(found <= 1.0)).sum())} of {len(rows)} checked rows are not a nearest code "
                    f"(worst: {float(found.max()):.3g}× the {precision} rounding slack above the minimum)")


def exact_nearest(x: Tensor, codebook: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """(min distance, argmin) per row by a float64 ‖x‖² − 2x·e + ‖e‖² expansion: for recall and inertia."""
    x64, e64 = x.detach().cpu().double(), codebook.detach().cpu().double()
    parts = [(torch.addmm((e64 ** 2).sum(1), b, e64.T, alpha=-2.0) + (b ** 2).sum(1, keepdim=True)).min(1)
             for b in x64.split(chunk)]
    return torch.cat([p.values for p in parts]).clamp_min(0), torch.cat([p.indices for p in parts])


def recall(x: Tensor, codebook: Tensor, indices, best: Tensor | None = None) -> tuple[float, int]:
    """(recall@1, rows scored) on up to RECALL_ROWS evenly spread rows; ``best``: their exact nearest codes."""
    rows = spread(x.shape[0], RECALL_ROWS)
    best = exact_nearest(x.detach().cpu()[rows], codebook)[1] if best is None else best
    return float((excess(x, codebook, indices, rows, best) <= 1.0).double().mean()), len(rows)


def check_output(case: Case, data: Data, role: str, output, rows, best, precision: str = "ieee") -> dict:
    """What the check found (rows, recall, loss, inertia); raises Wrong when the output is wrong. Searches are
    judged at ``precision`` (judge_precision)."""
    if role in YARDSTICKS:
        return {}
    if case.workload.startswith("rvq"):
        return check_residual(case, data, output, rows, best, precision)
    if case.workload == "kmeans":
        centroids = torch.as_tensor(output[0]).reshape(case.k, case.d).float()
        check_nearest(data.x, centroids, output[1], rows, precision=precision)
        return {"rows": len(rows), "inertia": float(exact_nearest(data.x, centroids)[0].sum())}
    if case.workload == "nearest_codes":  # output: the (N, k) indices
        try:
            reference.assert_nearest_k(data.x.cpu().float()[rows], data.codebook.cpu().float(),
                                       torch.as_tensor(output).detach().cpu().long()[rows], precision)
        except AssertionError as why:
            raise Wrong(f"not the nearest codes, sorted: {why}") from None
        return {"rows": len(rows)}
    quantized, indices = output[:2]
    if role == "approximate":
        found, scored = recall(data.x, data.codebook, indices)
        return {"recall_at_1": found, "rows": scored} | output[2]  # and the index's settings
    check_nearest(data.x, data.codebook, indices, rows, best, precision)
    got = quantized.detach().cpu().reshape(-1, case.d)[rows].float()  # straight-through outputs are x + (e − x):
    want = data.codebook.cpu()[indices.detach().cpu().reshape(-1)[rows]].float()  # equal up to one rounding
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max().clamp_min(1.0))):
        raise Wrong(f"quantized != codebook[indices] on {int((~torch.isclose(got, want)).any(1).sum())} checked rows")
    if case.workload == "nearest_code":
        return {"rows": len(rows)}
    loss, x = float(output[2].detach()), output[3]
    expected = COMMITMENT_WEIGHT * float(((x.detach() - data.codebook[indices.reshape(-1)]).double() ** 2).mean())
    if not abs(loss - expected) <= 1e-4 * max(abs(expected), 1e-12):  # `not <=`: a NaN loss is wrong too
        raise Wrong(f"loss {loss:.6g} != commitment_weight·mean((x − e_idx)²) = {expected:.6g}")
    if x.grad is None or not bool(torch.isfinite(x.grad).all()):
        raise Wrong("x.grad is missing or non-finite after backward")
    return {"rows": len(rows), "loss": loss}


def check_residual(case: Case, data: Data, output, rows, best, precision: str = "ieee") -> dict:
    """A ResidualVQ's first run, every level starting from data.codebook: quantized == Σ_l codebook[indices_l]
    (straight-through outputs up to a rounding per level), one finite loss per level, level 0 a nearest code
    (greedy training; a beam may keep another), and a finite x.grad after the training step's backward."""
    quantized, indices, losses = output[:3]
    indices = torch.as_tensor(indices).detach().cpu().reshape(-1, case.levels)
    if indices.shape[0] != case.n or indices.dtype.is_floating_point or int(indices.min()) < 0:
        raise Wrong(f"indices must be (N, levels) = ({case.n}, {case.levels}) codes >= 0, got {tuple(indices.shape)}")
    if case.workload == "rvq_train":
        check_nearest(data.x, data.codebook, indices[:, 0], rows, best, precision)
    got = quantized.detach().cpu().reshape(-1, case.d)[rows].float()
    want = data.codebook.cpu().float()[indices[rows]].sum(1)
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-5 * case.levels * float(want.abs().max().clamp_min(1.0))):
        raise Wrong(f"quantized != Σ codebook[indices] on {int((~torch.isclose(got, want)).any(1).sum())} checked rows")
    if losses.shape != (case.levels,) or not bool(torch.isfinite(losses).all()):
        raise Wrong(f"losses must be {case.levels} finite values, got {losses}")
    if case.workload == "rvq_train" and (output[3].grad is None or not bool(torch.isfinite(output[3].grad).all())):
        raise Wrong("x.grad is missing or non-finite after backward")
    return {"rows": len(rows), "loss": float(losses.detach().sum())}
