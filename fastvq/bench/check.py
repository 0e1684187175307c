"""--check: every fastvq backend that runs on the device against fastvq.reference: N, K, d from 1, 3,
33, 257, 1030; fp32 and bf16; random, small-integer (exact distances, duplicate codes: indices must be
torch.argmin's) and non-contiguous x; indices, sqdist, quantize's gather, ema_stats."""
from __future__ import annotations

import torch

import fastvq
from fastvq import reference

SHAPES = ((1, 1, 1), (3, 257, 33), (33, 3, 1030), (257, 1030, 3), (1030, 33, 257), (1030, 257, 1))


def backends_here(device: torch.device) -> dict[str, str | None]:
    """Every fastvq backend but the oracle ("torch") -> None if it runs on ``device``, else why not."""
    probe, reasons = torch.zeros(1, 1, device=device), dict(fastvq.unavailable_reasons())
    for backend in (b for b in fastvq.available_backends() if b != "torch"):
        try:
            fastvq.nearest_code(probe, probe, backend=backend)
            reasons[backend] = None
        except fastvq.BackendNotSupportedError as why:
            reasons[backend] = str(why)
    return reasons


def _expect(ok: bool, message: str) -> None:
    if not ok:  # not an assert statement: python -O must not skip the check
        raise AssertionError(message)


def _check_one(backend: str, x: torch.Tensor, codebook: torch.Tensor, exact: bool) -> None:
    """Raises AssertionError (from reference's judge, torch.testing or _expect) where the backend is wrong."""
    indices, sqdist = fastvq.nearest_code(x, codebook, backend=backend)
    reference.assert_nearest(x.float(), codebook.float(), indices)
    if exact:
        want = reference.nearest_code(x.float(), codebook.float())[0]
        _expect(torch.equal(indices, want), f"{int((indices != want).sum())} rows differ from torch.argmin")
    torch.testing.assert_close(sqdist, ((x.float() - codebook.float()[indices]) ** 2).sum(1), rtol=1e-4,
                               atol=1e-5 * x.shape[1], msg=lambda m: f"sqdist != ‖x − e_idx‖²: {m}")
    quantized, again = fastvq.quantize(x, codebook, backend=backend)
    _expect(torch.equal(again, indices), "quantize's indices differ from nearest_code's")
    _expect(torch.equal(quantized, codebook[indices].to(x.dtype)), "quantize: quantized != codebook[indices]")
    counts, sums = fastvq.ema_stats(x, indices, codebook.shape[0], backend=backend)
    want_counts, want_sums = reference.ema_stats(x, indices, codebook.shape[0])
    _expect(torch.equal(counts.float(), want_counts.float()), "ema_stats counts differ from the reference")
    torch.testing.assert_close(sums.float(), want_sums.float(), rtol=1e-4, atol=1e-3,
                               msg=lambda m: f"ema_stats sums: {m}")


def check_backend(backend: str, device: torch.device) -> list[str]:
    """What is wrong with one backend over every shape, dtype and kind of input (empty: nothing)."""
    failures = []
    for (n, k, d), dtype in ((shape, dtype) for shape in SHAPES for dtype in (torch.float32, torch.bfloat16)):
        g = torch.Generator().manual_seed(n * k + d)
        codes = torch.randint(-3, 4, (k, d), generator=g).float()
        codes[1::2] = codes[0:k - 1:2]  # duplicate codes: exact ties
        for kind, (x, codebook) in {
            "random": (torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)),
            "small-integer": (torch.randint(-3, 4, (n, d), generator=g).float(), codes),
            "non-contiguous": (torch.randn(d, n, generator=g).T, torch.randn(k, d, generator=g)),
        }.items():
            try:
                _check_one(backend, x.to(device, dtype), codebook.to(device, dtype), exact=kind == "small-integer")
            except Exception as error:  # a crash is a failure too, reported with its configuration
                failures.append(f"{backend} {n}x{k}x{d} {str(dtype)[6:]} {kind}: {type(error).__name__}: {error}")
    return failures


def check_device(device: torch.device, out=print) -> int:
    """Check every backend that runs on ``device``: 0 if all are right, 1 if one is wrong or none runs."""
    backends, failures = backends_here(device), []
    checked = [b for b, why in backends.items() if why is None]
    for backend, why in backends.items():
        out(f"check {backend}: " + ("checking" if why is None else f"skipped: {why}"))
        failures += check_backend(backend, device) if why is None else []
    for failure in failures:
        out(f"FAILED {failure}")
    if not checked:
        out(f"check on {device}: no fastvq backend but the torch oracle runs here")
    else:
        out(f"check on {device}: {', '.join(checked)}: " + (f"{len(failures)} failures" if failures else "all right"))
    return 1 if failures or not checked else 0

