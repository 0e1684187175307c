"""Providers: one function each, ``setup(case, data) -> run``, building what is built once (an index,
a module) or raising ``Absent``; ``run()`` is one timed call and returns what the check needs:
(quantized, indices[, loss, x]) or, for k-means, (centroids, assignments). Baselines' packages are
imported inside setup only."""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

import fastvq

from .cases import WORKLOADS, Case, Data
from .judge import exact_nearest, excess
from .machine import limit_faiss

DECAY, COMMITMENT_WEIGHT, EPS = 0.99, 0.25, 1e-5  # both quantizers of the training step
IVF_MIN_CODES, IVF_RECALL, IVF_TUNING_ROWS = 65536, 0.9, 512  # IVF is shown for large codebooks only


class Absent(Exception):
    """The provider cannot run here; the message says why."""


@dataclass(frozen=True)
class Provider:
    name: str
    workload: str
    role: str  # sgemm (the yardstick, unchecked) | baseline | fastvq | approximate (timed, recall shown)
    description: str
    setup: Callable[[Case, Data], Callable[[], object]]
    opt_in: bool = False  # only when named in --providers (fastvq-torch, the slow oracle)


REGISTRY: list[Provider] = []


def provider(workloads: tuple[str, ...], name: str, description: str, role: str = "baseline"):
    def register(setup):
        REGISTRY.extend(Provider(name, workload, role, description, setup) for workload in workloads)
        return setup
    return register


def _import(module: str):
    try:
        return importlib.import_module(module)
    except Exception as error:  # a missing or broken package makes the provider absent, never a crash
        raise Absent(f"{module} is not importable ({type(error).__name__}: {error})") from None


@provider(WORKLOADS, "sgemm", "torch.mm(x, codebook.T) into a preallocated N×K output: the sgemm yardstick", "sgemm")
def sgemm(case: Case, data: Data):
    out = torch.empty(case.n, case.k, dtype=data.x.dtype, device=data.x.device)
    return lambda: torch.mm(data.x, data.codebook.T, out=out)


@provider(("nearest_code",), "naive", "torch.cdist + argmin + gather")
def naive(case: Case, data: Data):
    def run():
        indices = torch.cdist(data.x, data.codebook).argmin(1)
        return data.codebook[indices], indices
    return run


@provider(("nearest_code",), "addmm", "torch.addmm(‖e‖², x, eᵀ, alpha=−2) + argmin + gather")
def addmm(case: Case, data: Data):
    def run():
        e = data.codebook
        indices = torch.addmm((e * e).sum(1), data.x, e.T, alpha=-2.0).argmin(1)
        return e[indices], indices
    return run


def _faiss(data: Data):
    if data.x.device.type != "cpu" or data.x.dtype != torch.float32:
        raise Absent("faiss-cpu takes float32 CPU tensors only")
    faiss = _import("faiss")
    limit_faiss(faiss)
    faiss.omp_set_num_threads(torch.get_num_threads())
    return faiss


def _faiss_search(index, data: Data, **info):
    def run():
        indices = torch.from_numpy(index.search(data.x.numpy(), 1)[1][:, 0])
        return data.codebook[indices], indices
    run.info = info  # reported beside the check
    return run


@provider(("nearest_code",), "faiss-flat", "faiss-cpu IndexFlatL2, k=1 (exact), + gather")
def faiss_flat(case: Case, data: Data):
    index = _faiss(data).IndexFlatL2(case.d)
    index.add(data.codebook.numpy())
    return _faiss_search(index, data)


def ivf_nlist(num_codes: int) -> int:
    """About 4·√K lists, a power of two, with >= 39 training codes per list (faiss's minimum)."""
    return max(1, min(2 ** round(math.log2(max(1.0, 4.0 * math.sqrt(num_codes)))), num_codes // 39))


@provider(("nearest_code",), "faiss-ivf", f"faiss-cpu IndexIVFFlat, nlist≈4√K, the smallest power-of-2 nprobe with "
                                          f"recall@1 >= {IVF_RECALL} on a tuning sample (approximate)", "approximate")
def faiss_ivf(case: Case, data: Data):
    if case.k < IVF_MIN_CODES:
        raise Absent(f"not applicable: IVF is shown for K >= {IVF_MIN_CODES}")
    faiss, nlist, codes = _faiss(data), ivf_nlist(case.k), data.codebook.numpy()
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(case.d), case.d, nlist, faiss.METRIC_L2)
    index.cp.seed = 0
    index.train(codes)
    index.add(codes)
    sample = data.x[torch.randperm(case.n, generator=torch.Generator().manual_seed(1))[:IVF_TUNING_ROWS]]
    best, every_row = exact_nearest(sample, data.codebook)[1], torch.arange(len(sample))
    index.nprobe = 1
    while index.nprobe < nlist:
        found = torch.from_numpy(index.search(sample.numpy(), 1)[1][:, 0])
        if float((excess(sample, data.codebook, found, every_row, best) <= 1).double().mean()) >= IVF_RECALL:
            break
        index.nprobe = min(2 * index.nprobe, nlist)
    return _faiss_search(index, data, nprobe=index.nprobe, nlist=nlist)


@provider(("kmeans",), "faiss-kmeans", "faiss.Kmeans(d, K, niter=iters, k-means++ init, no subsampling) + assignment")
def faiss_kmeans(case: Case, data: Data):
    if case.k > case.n:
        raise Absent(f"not applicable: K={case.k} > N={case.n}")
    faiss, x = _faiss(data), data.x.numpy()
    options = {"niter": case.iters, "seed": 0, "verbose": False,  # every point used, none warned about
               "max_points_per_centroid": case.n, "min_points_per_centroid": 1}
    if hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS"):  # k-means++ where this faiss has it
        options["init_method"] = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS

    def run():
        kmeans = faiss.Kmeans(case.d, case.k, **options)
        kmeans.train(x)
        return torch.from_numpy(kmeans.centroids), torch.from_numpy(kmeans.index.search(x, 1)[1][:, 0])
    return run


def _train_step(module: torch.nn.Module, data: Data):
    x = data.x.clone().requires_grad_(True)  # a leaf, like an encoder's output
    one = torch.ones((), device=x.device)

    def run():
        x.grad = None
        quantized, indices, loss = module(x)
        torch.autograd.backward([quantized, loss], [data.grad_out, one.to(loss.dtype)])
        return quantized, indices, loss, x
    return run


@provider(("train",), "vector-quantize-pytorch", f"vector_quantize_pytorch.VectorQuantize(dim, K, decay={DECAY}, "
                                                 f"commitment_weight={COMMITMENT_WEIGHT}, rotation_trick=False), EMA")
def vector_quantize_pytorch(case: Case, data: Data):
    module = _import("vector_quantize_pytorch").VectorQuantize(
        case.d, case.k, decay=DECAY, eps=EPS, commitment_weight=COMMITMENT_WEIGHT, rotation_trick=False,
    ).to(data.x.device).train()
    state = module._codebook  # the same start as FastVectorQuantizer.set_codebook
    with torch.no_grad():
        state.embed.copy_(data.codebook.reshape(state.embed.shape))
        state.embed_avg.copy_(data.codebook.reshape(state.embed_avg.shape))
        state.cluster_size.fill_(1.0)
    return _train_step(module, data)


def fastvq_setup(case: Case, data: Data, backend: str):
    """fastvq.quantize, a FastVectorQuantizer training step, or fastvq.kmeans, on ``backend``."""
    if backend in fastvq.unavailable_reasons():
        raise Absent(fastvq.unavailable_reasons()[backend])
    if backend == "triton" and data.x.device.type == "cpu":
        raise Absent("triton runs CPU tensors only in its interpreter, which is not a performance path")
    if case.workload == "nearest_code":
        return lambda: fastvq.quantize(data.x, data.codebook, backend=backend)
    if case.workload == "kmeans":
        if case.k > case.n:
            raise Absent(f"not applicable: K={case.k} > N={case.n}")
        return lambda: fastvq.kmeans(data.x, case.k, iters=case.iters, seed=0, init="kmeans++", backend=backend)
    module = fastvq.FastVectorQuantizer(case.d, case.k, decay=DECAY, eps=EPS, commitment_weight=COMMITMENT_WEIGHT,
                                        ema_update=True, backend=backend).to(data.x.device).train()
    module.set_codebook(data.codebook)
    return _train_step(module, data)


FASTVQ = {"nearest_code": "fastvq.quantize(x, codebook, backend={!r}): fused search + gather",
          "train": f"fastvq.FastVectorQuantizer(dim, K, decay={DECAY}, commitment_weight={COMMITMENT_WEIGHT}, "
                   "backend={!r}), EMA",
          "kmeans": "fastvq.kmeans(x, K, iters=iters, init='kmeans++', backend={!r})"}
REGISTRY += [Provider(f"fastvq-{backend}", workload, "fastvq", text.format(backend),
                      partial(fastvq_setup, backend=backend), opt_in=backend == "torch")
             for backend in [*fastvq.available_backends(), *fastvq.unavailable_reasons()]
             for workload, text in FASTVQ.items()]


def names() -> list[str]:
    return sorted({p.name for p in REGISTRY})


def select(spec: str | None) -> dict[str, list[Provider]]:
    """--providers a,b: these (and always the sgemm yardstick), per workload; None: all but the opt-in ones."""
    wanted = None if spec is None else {n.strip() for n in spec.split(",") if n.strip()}
    if wanted is not None and (not wanted or wanted - set(names())):
        raise ValueError(f"--providers must be a comma-separated subset of {names()}, got {spec!r}")
    keep = (lambda p: not p.opt_in) if wanted is None else (lambda p: p.role == "sgemm" or p.name in wanted)
    return {w: [p for p in REGISTRY if p.workload == w and keep(p)] for w in WORKLOADS}


def find(workload: str, name: str) -> Provider:
    return next(p for p in REGISTRY if p.workload == workload and p.name == name)
