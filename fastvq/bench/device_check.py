"""``python -m fastvq.bench --device D --check``: before any timing, every fastvq backend that runs on D, against
fastvq.reference's one judge.

- N, K, d from 1, 3, 33, 257, 1030, and three shapes for the Triton search's paths: 4099×1030×64 (whole tiles,
  bf16 with the norms on the tensor cores), 257×2048×200 (split over codes, a 256-wide resident x) and
  257×4096×33 (split, narrow); fp32 and bf16; random, small-integer (exact, with ties: the indices must be
  argmin's) and non-contiguous x; indices, sqdist, quantize and ema_stats;
- on CUDA, a side stream: inputs written there just before the call, behind a spin of the stream, so a kernel
  launched on the default stream instead of the current one reads them unwritten;
- with a second CUDA device, the edge shapes again on it while the first stays current (the launch's device guard);
- FastVectorQuantizer's training step under bf16 autocast: nearest codes, loss and a finite input gradient;
- on Hopper, the triton backend's bf16 cases with d <= 64 again with fastvq.triton.set_search_kernel("gluon"),
  which runs them on the pipelined-wgmma Gluon kernel (nearest_code_gluon.py), so one run validates it.
"""
from __future__ import annotations

import itertools
from functools import partial

import torch

import fastvq
from fastvq import reference
from fastvq.dispatch import explain, get_backend, resolve

from .judge import Wrong, check_nearest, spread

SHAPES = ((1, 1, 1), (3, 257, 33), (33, 3, 1030), (257, 1030, 3), (1030, 33, 257), (1030, 257, 1),
          (4099, 1030, 64), (257, 2048, 200), (257, 4096, 33))
SPIN_CYCLES = 50_000_000  # tens of milliseconds of a busy side stream: far longer than a kernel launch


def check_backend(backend: str, device: torch.device, dtypes=(torch.float32, torch.bfloat16),
                  max_dim: int | None = None) -> list[str]:
    """What is wrong with one backend over every shape (d <= max_dim, when given), dtype and kind of input (empty:
    nothing), as judged by reference.assert_nearest (at the backend's search precision) and torch.testing (not
    assert statements: python -O must not skip the check)."""
    failures, same = [], partial(torch.testing.assert_close, rtol=0, atol=0)
    shapes = [shape for shape in SHAPES if max_dim is None or shape[2] <= max_dim]
    for (n, k, d), dtype in itertools.product(shapes, dtypes):
        g = torch.Generator().manual_seed(n * k + d)
        codes = torch.randint(-3, 4, (k, d), generator=g).float()
        codes[1::2] = codes[0:k - 1:2]  # duplicate codes: exact ties
        for kind, (x, e) in {
            "random": (torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)),
            "small-integer": (torch.randint(-3, 4, (n, d), generator=g).float(), codes),
            "non-contiguous": (torch.randn(d, n, generator=g).T, torch.randn(k, d, generator=g)),
        }.items():
            x, e = x.to(device, dtype), e.to(device, dtype)  # e: the codebook
            try:
                indices, sqdist = fastvq.nearest_code(x, e, backend=backend)
                precision = get_backend(backend).search_precision(device, dtype, dtype)
                reference.assert_nearest(x.float(), e.float(), indices, precision)
                if kind == "small-integer":  # exact distances: the indices must be torch.argmin's
                    same(indices, reference.nearest_code(x.float(), e.float())[0], msg=lambda m: f"not argmin: {m}")
                torch.testing.assert_close(sqdist, ((x.float() - e.float()[indices]) ** 2).sum(1), rtol=1e-4,
                                           atol=1e-5 * d, msg=lambda m: f"sqdist != ‖x − e_idx‖²: {m}")
                quantized, again = fastvq.quantize(x, e, backend=backend)
                same(again, indices, msg=lambda m: f"quantize's indices differ from nearest_code's: {m}")
                same(quantized, e[indices], msg=lambda m: f"quantize: quantized != codebook[indices]: {m}")
                counts, sums = fastvq.ema_stats(x, indices, k, backend=backend)
                want_counts, want_sums = reference.ema_stats(x, indices, k)
                same(counts.float(), want_counts.float(), msg=lambda m: f"ema_stats counts: {m}")
                torch.testing.assert_close(sums.float(), want_sums.float(), rtol=1e-4, atol=1e-3,
                                           msg=lambda m: f"ema_stats sums: {m}")
            except Exception as error:  # a crash is a failure too, reported with its configuration
                failures.append(f"{backend} {n}x{k}x{d} {str(dtype)[6:]} {kind}: {type(error).__name__}: {error}")
    return failures


def check_side_stream(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> list[str]:
    """nearest_code and quantize on a CUDA side stream give the reference's indices (small-integer data, exact)."""
    if device.type != "cuda":
        return []
    g = torch.Generator().manual_seed(5)
    x, e = torch.randint(-3, 4, (1030, 33), generator=g).float(), torch.randint(-3, 4, (257, 33), generator=g).float()
    want = reference.nearest_code(x, e)[0]
    x_here, e_here = x.to(device, dtype), e.to(device, dtype)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(side):
            torch.cuda._sleep(SPIN_CYCLES)
            x_side, e_side = x_here * 1, e_here * 1  # written on the side stream, after the spin
            indices = fastvq.nearest_code(x_side, e_side, backend=backend)[0]
            quantized, again = fastvq.quantize(x_side, e_side, backend=backend)
        side.synchronize()
        torch.testing.assert_close(indices.cpu(), want, rtol=0, atol=0, msg=lambda m: f"nearest_code: {m}")
        torch.testing.assert_close(again.cpu(), want, rtol=0, atol=0, msg=lambda m: f"quantize: {m}")
        torch.testing.assert_close(quantized.cpu().float(), e[want], rtol=0, atol=0, msg=lambda m: f"quantized: {m}")
    except Exception as error:
        return [f"{backend} on a side stream of {device}: {type(error).__name__}: {error}"]
    return []


def check_second_device(backend: str, device: torch.device) -> list[str]:
    """The edge shapes on another CUDA device than the current one (none: nothing to check)."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return []
    here = device.index or 0
    other = torch.device("cuda", (here + 1) % torch.cuda.device_count())
    with torch.cuda.device(here):
        return check_backend(backend, other)


def check_autocast_module(device: torch.device) -> list[str]:
    """A FastVectorQuantizer training step under bf16 autocast (backend "auto"): nearest codes of the codebook the
    search saw, a loss equal to mean((x − e_idx)²) (commitment weight 1, vqp's default) and a finite x.grad."""
    torch.manual_seed(3)
    module = fastvq.FastVectorQuantizer(dim=64, codebook_size=512).to(device)
    x = torch.randn(2, 300, 64, device=device, requires_grad=True)
    codebook = module._codebook.embed[0].detach().clone()  # the EMA step moves it after the search
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            quantized, indices, loss = module(x)
        (quantized.float().square().sum() + loss.float()).backward()
        flat = x.detach().reshape(-1, 64)
        searched_by = resolve("auto", flat, codebook)  # the backend auto dispatch ran the search on
        check_nearest(flat, codebook, indices, spread(flat.shape[0], 512),
                      precision=searched_by.search_precision(device, flat.dtype, codebook.dtype))
        expected = float(((flat - codebook[indices.reshape(-1)]).double() ** 2).mean())
        got = float(loss.detach())
        if not abs(got - expected) <= 1e-4 * max(expected, 1e-12):  # `not <=`: a NaN loss is wrong too
            raise Wrong(f"loss {got:.6g} != mean((x − e_idx)²) = {expected:.6g}")
        if x.grad is None or not bool(torch.isfinite(x.grad).all()):
            raise Wrong("x.grad is missing or non-finite after backward")
    except Exception as error:
        return [f"FastVectorQuantizer under bf16 autocast on {device}: {type(error).__name__}: {error}"]
    return []


def check_gluon_search(device: torch.device, out=print) -> list[str]:
    """The triton backend's checks with the Gluon search, where it runs (Hopper), on the inputs it takes: bf16,
    d <= its MAX_D (every other input runs the Triton kernels, checked already)."""
    import fastvq.triton as kernels

    probe = torch.zeros(1, 1, device=device, dtype=torch.bfloat16)
    why = kernels.gluon_search_reason(probe, probe)
    out("check triton with set_search_kernel('gluon'): " + (f"skipped: {why}" if why else "checking"))
    if why:
        return []
    kernels.set_search_kernel("gluon")
    try:
        from fastvq.triton.nearest_code_gluon import MAX_D

        failures = check_backend("triton", device, (torch.bfloat16,), MAX_D)
        failures += check_side_stream("triton", device, torch.bfloat16)
    finally:
        kernels.set_search_kernel(None)
    return [f"(gluon search) {failure}" for failure in failures]


def check_device(device: torch.device, out=print) -> int:
    """0 if every backend but the oracle ("torch") that runs on ``device`` is right; 1 if one is wrong or none runs."""
    reasons = {b: "; ".join(why) for b, why in explain(torch.zeros(1, 1, device=device)).items() if b != "torch"}
    checked, failures = [b for b, why in reasons.items() if not why], []
    for backend, why in reasons.items():
        out(f"check {backend}: " + (f"skipped: {why}" if why else "checking"))
        if not why:
            failures += check_backend(backend, device) + check_side_stream(backend, device)
            failures += check_second_device(backend, device)
    if "triton" in checked:
        failures += check_gluon_search(device, out)
    if checked:
        out("check FastVectorQuantizer under bf16 autocast")
        failures += check_autocast_module(device)
    for failure in failures:
        out(f"FAILED {failure}")
    verdict = f"{', '.join(checked)}: " + (f"{len(failures)} failures" if failures else "all right")
    out(f"check on {device}: " + (verdict if checked else "no fastvq backend but the torch oracle runs here"))
    return 1 if failures or not checked else 0
