"""Validate and time fastvq's GPU backends (triton, cuda) on a CUDA machine.

    python benchmarks/gpu_check.py [--shapes 32768x1024x64 ...] [--dtypes float32 bfloat16] [--repeats 20]

For every GPU backend this install can run, and every shape and dtype:
1. correctness against fastvq.reference: nearest_code on a sample of rows (the chosen code
   must be a nearest code up to float32 rounding, sqdist must equal ‖x − e_idx‖², quantized
   must equal codebook[idx]), then quantize_backward and ema_stats on the whole batch, and
   torch.compile(fullgraph=True) through the Triton op;
2. timing (median of CUDA-event timings) of the search+gather against naive PyTorch
   (‖x‖² − 2x·eᵀ + ‖e‖², argmin: what most VQ code does), a plain torch.mm of the same shapes
   (the roofline: the search is that GEMM plus a min-epilogue) and faiss-gpu when installed.
It prints one table. Target on an H100 with bf16: triton within 2× of torch.mm and at least
3× faster than naive. Without a CUDA device it says so and exits 0: nothing here can run.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

CORE_SHAPES = ["32768x1024x64", "16384x16384x64", "8192x65536x32", "65536x16384x256"]
GPU_BACKENDS = ("triton", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAMPLE_ROWS = 1024


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        n, k, d = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes look like 32768x1024x64 (N x K x d), got {text!r}") from None
    return n, k, d


# ---- timing ----------------------------------------------------------------------------------
def time_ms(fn, repeats: int) -> float:
    for _ in range(3):  # warm-up: compilation, autotuning, allocator
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def naive_search(x, e):
    scores = x.float().pow(2).sum(1, keepdim=True) - 2 * (x @ e.t()).float() + e.float().pow(2).sum(1)
    indices = scores.argmin(1)
    return indices, e[indices]


def faiss_search_fn(x, e):
    """faiss-gpu flat L2 search (float32 only), or None when faiss has no GPU support here."""
    try:
        import faiss  # a baseline only: imported here, never by fastvq
    except ImportError:
        return None
    if not hasattr(faiss, "StandardGpuResources") or x.dtype != torch.float32:
        return None
    resources = faiss.StandardGpuResources()
    config = faiss.GpuIndexFlatConfig()
    config.device = x.device.index or 0
    index = faiss.GpuIndexFlatL2(resources, e.shape[1], config)
    index.add(e.cpu().numpy())
    queries = x.cpu().numpy()  # faiss's python API copies through the host; timed as a user sees it
    return lambda: index.search(queries, 1)


def providers(x, e, backends):
    from fastvq import dispatch

    table = {}
    for name in backends:
        backend = dispatch.get_backend(name)
        table[f"fastvq-{name}"] = (lambda b: lambda: b.nearest_code(x, e, want_quantized=True))(backend)
    table["naive torch"] = lambda: naive_search(x, e)
    table["torch.mm (roofline)"] = lambda: torch.mm(x, e.t())
    faiss_fn = faiss_search_fn(x, e)
    if faiss_fn is not None:
        table["faiss-gpu"] = faiss_fn
    return table


# ---- correctness -------------------------------------------------------------------------------
def check_nearest(backend, x, e) -> list[str]:
    from fastvq import reference

    problems = []
    indices, sqdist, quantized = backend.nearest_code(x, e, want_quantized=True)
    rows = torch.linspace(0, x.shape[0] - 1, min(SAMPLE_ROWS, x.shape[0]), device=x.device).long()
    xs, chosen = x[rows].double(), indices[rows]
    best_index, _ = reference.nearest_code(xs, e.double())
    ed = e.double()
    best = ((xs - ed[best_index]) ** 2).sum(1)
    got = ((xs - ed[chosen]) ** 2).sum(1)
    slack = 2 * (x.shape[1] + 2) * 2.0**-24 * ((xs**2).sum(1) + 2 * (ed**2).sum(1).max())
    if not bool((got - best <= slack).all()):
        worst = int(torch.argmax(got - best - slack))
        problems.append(f"row {int(rows[worst])}: code {int(chosen[worst])} at {float(got[worst]):.6g}, "
                        f"but code {int(best_index[worst])} is at {float(best[worst]):.6g}")
    if not torch.allclose(sqdist[rows].double(), got, rtol=1e-5, atol=1e-5):
        problems.append("sqdist differs from ‖x − e_idx‖²")
    if not torch.equal(quantized, e[indices].to(x.dtype)):
        problems.append("quantized differs from codebook[indices]")
    return problems


def check_training_ops(backend, x, e) -> list[str]:
    from fastvq import reference

    problems = []
    generator = torch.Generator(device=x.device).manual_seed(0)
    indices = torch.randint(0, e.shape[0], (x.shape[0],), device=x.device, generator=generator)
    grad_q = torch.randn(x.shape, device=x.device, generator=generator).to(x.dtype)
    scales = (torch.tensor(0.3, device=x.device), torch.tensor(-0.7, device=x.device))
    grad_x, grad_e = backend.quantize_backward(grad_q, x, e, indices, *scales, True, True)
    want_x, want_e = reference.quantize_backward(grad_q, x, e, indices, *scales)
    tol = dict(rtol=1e-5, atol=1e-5) if x.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    if not torch.allclose(grad_x.float(), want_x.float(), **tol):
        problems.append("quantize_backward grad_x differs from the reference")
    if not torch.allclose(grad_e.float(), want_e.float(), **tol):
        problems.append("quantize_backward grad_codebook differs from the reference")
    counts, sums = backend.ema_stats(x, indices, e.shape[0])
    want_counts, want_sums = reference.ema_stats(x, indices, e.shape[0])
    if not torch.equal(counts, want_counts.float()):
        problems.append("ema_stats counts differ from the reference")
    if not torch.allclose(sums, want_sums.float(), rtol=1e-4, atol=1e-3):
        problems.append("ema_stats sums differ from the reference")
    return problems


def check_compile(x, e) -> list[str]:
    import fastvq.triton  # noqa: F401  (registers torch.ops.fastvq.triton_*)

    def search(a, b):
        indices, sqdist, _ = torch.ops.fastvq.triton_nearest_code(a, b, False)
        return indices, sqdist * 2

    eager = search(x, e)
    try:
        compiled = torch.compile(search, fullgraph=True)(x, e)
    except Exception as error:  # reported in the table, never hidden
        return [f"torch.compile(fullgraph=True) failed: {type(error).__name__}: {error}"]
    if not (torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])):
        return ["torch.compile result differs from eager"]
    return []


# ---- main ------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in CORE_SHAPES])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False). "
              "This script validates and times the GPU backends and needs a GPU; nothing was run.")
        return 0

    from fastvq import dispatch

    device = torch.device("cuda")
    print(f"gpu_check on {torch.cuda.get_device_name(device)} "
          f"(sm {'.'.join(map(str, torch.cuda.get_device_capability(device)))}), torch {torch.__version__}")
    probe = torch.empty(1, 1, device=device)
    backends = []
    for name in GPU_BACKENDS:
        reasons = dispatch.get_backend(name).not_supported_reasons(probe)
        print(f"  {name}: " + ("ready" if not reasons else "skipped: " + "; ".join(reasons)))
        if not reasons:
            backends.append(name)

    failures = 0
    header = f"{'N x K x d':>18} {'dtype':>8}  {'provider':<20} {'ms':>9} {'TFLOP/s':>8} {'vs mm':>7} {'vs naive':>9}"
    rows = []
    for n, k, d in args.shapes:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            generator = torch.Generator(device=device).manual_seed(n + k + d)
            x = torch.randn(n, d, device=device, generator=generator).to(dtype)
            e = torch.randn(k, d, device=device, generator=generator).to(dtype)
            for name in backends:
                backend = dispatch.get_backend(name)
                if backend.not_supported_reasons(x, e):
                    continue
                problems = check_nearest(backend, x, e) + check_training_ops(backend, x[:65536], e)
                if name == "triton":
                    problems += check_compile(x, e)
                failures += bool(problems)
                for problem in problems:
                    print(f"FAIL {name} {n}x{k}x{d} {dtype_name}: {problem}")
            times = {}
            for label, fn in providers(x, e, [b for b in backends
                                              if not dispatch.get_backend(b).not_supported_reasons(x, e)]).items():
                try:
                    times[label] = time_ms(fn, args.repeats)
                except torch.cuda.OutOfMemoryError:
                    times[label] = None
                    torch.cuda.empty_cache()
            flops = 2.0 * n * k * d
            for label, ms in times.items():
                if ms is None:
                    rows.append(f"{f'{n}x{k}x{d}':>18} {dtype_name:>8}  {label:<20} {'OOM':>9}")
                    continue
                vs_mm = ms / times["torch.mm (roofline)"] if times.get("torch.mm (roofline)") else float("nan")
                naive = times.get("naive torch")
                vs_naive = f"{naive / ms:8.2f}x" if naive else "      n/a"
                rows.append(f"{f'{n}x{k}x{d}':>18} {dtype_name:>8}  {label:<20} {ms:9.3f} "
                            f"{flops / ms / 1e9:8.1f} {vs_mm:6.2f}x {vs_naive}")
    print()
    print(header)
    print("\n".join(rows))
    print("\nvs mm: time / torch.mm time (target <= 2x for fastvq-triton, bf16, H100); "
          "vs naive: naive time / time (target >= 3x)")
    print("correctness: " + ("all checks passed" if not failures else f"{failures} configuration(s) FAILED"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
