"""Providers: one function each, ``setup(case, data) -> run``, building what is built once (an index, a module)
or raising ``Absent``; ``run()`` is one timed call and returns what the check needs: (quantized, indices[, loss, x]),
IVF's (quantized, indices, settings), k-means' (centroids, assignments). Baselines are imported inside setup only."""
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

import fastvq

from .cases import TOPK, WORKLOADS, Case, Data
from .judge import exact_nearest, recall

# IVF is shown for large codebooks only; its tuning sample fits judge.RECALL_ROWS, so recall scores every row
IVF_MIN_CODES, IVF_RECALL, IVF_TUNING_ROWS = 65536, 0.9, 512


class Absent(Exception):
    """The provider cannot run here; the message says why."""


@dataclass(frozen=True)
class Provider:
    name: str
    workload: str
    role: str  # sgemm, memory (yardsticks, unchecked) | baseline | fastvq | approximate (timed, recall shown)
    description: str
    setup: Callable[[Case, Data], Callable[[], object]]
    opt_in: bool = False  # only when named in --providers (fastvq-torch, the slow oracle)


REGISTRY: dict[tuple[str, str], Provider] = {}  # (workload, name) -> provider


def provider(workloads: tuple[str, ...], name: str, description: str, role: str = "baseline", opt_in: bool = False):
    def register(setup):
        REGISTRY.update({(w, name): Provider(name, w, role, description, setup, opt_in) for w in workloads})
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


# Calls of this many rows or fewer (streaming) also time the memory yardstick below
READ_YARDSTICK_MAX_ROWS = 32


@provider(("nearest_code",), "int8-read", "torch.amax over K·(d+8) int8 bytes (the int8 codes, scales and norms the "
                                          f"cpu scan reads), calls of <= {READ_YARDSTICK_MAX_ROWS} rows: the memory "
                                          "yardstick", "memory")
def int8_read(case: Case, data: Data):
    if data.x.device.type != "cpu" or case.n > READ_YARDSTICK_MAX_ROWS:
        raise Absent(f"not applicable: the memory yardstick is timed for CPU calls of <= {READ_YARDSTICK_MAX_ROWS} "
                     "rows (streaming)")
    codes = torch.randint(-127, 128, (case.int8_code_bytes,), dtype=torch.int8,
                          generator=torch.Generator().manual_seed(0))
    return lambda: torch.amax(codes)


def _gathered(codebook: torch.Tensor, indices: torch.Tensor):
    return codebook[indices], indices


@provider(("nearest_code",), "naive", "torch.cdist + argmin + gather")
def naive(case: Case, data: Data):
    return lambda: _gathered(data.codebook, torch.cdist(data.x, data.codebook).argmin(1))


@provider(("nearest_code",), "addmm", "torch.addmm(‖e‖², x, eᵀ, alpha=−2) + argmin + gather")
def addmm(case: Case, data: Data):
    e = data.codebook
    return lambda: _gathered(e, torch.addmm((e * e).sum(1), data.x, e.T, alpha=-2.0).argmin(1))


def _faiss(data: Data):
    if data.x.device.type != "cpu" or data.x.dtype != torch.float32:
        raise Absent("faiss-cpu takes float32 CPU tensors only")
    faiss = _import("faiss")
    faiss.omp_set_num_threads(torch.get_num_threads())
    return faiss


def _nearest(index, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(index.search(x.numpy(), 1)[1][:, 0])


@provider(("nearest_code",), "faiss-flat", "faiss-cpu IndexFlatL2, k=1 (exact), + gather")
def faiss_flat(case: Case, data: Data):
    index = _faiss(data).IndexFlatL2(case.d)
    index.add(data.codebook.numpy())
    return lambda: _gathered(data.codebook, _nearest(index, data.x))


@provider(("nearest_codes",), "naive", f"torch.cdist + topk(k={TOPK}, largest=False)")
def naive_topk(case: Case, data: Data):
    return lambda: torch.cdist(data.x, data.codebook).topk(TOPK, dim=1, largest=False).indices


@provider(("nearest_codes",), "faiss-flat", f"faiss-cpu IndexFlatL2.search(x, k={TOPK}) (exact)")
def faiss_flat_topk(case: Case, data: Data):
    index = _faiss(data).IndexFlatL2(case.d)
    index.add(data.codebook.numpy())
    return lambda: torch.from_numpy(index.search(data.x.numpy(), TOPK)[1])


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
    best = exact_nearest(sample, data.codebook)[1]
    index.nprobe = 1
    while index.nprobe < nlist and recall(sample, data.codebook, _nearest(index, sample), best)[0] < IVF_RECALL:
        index.nprobe = min(2 * index.nprobe, nlist)
    return lambda: (*_gathered(data.codebook, _nearest(index, data.x)), {"nprobe": index.nprobe, "nlist": nlist})


@provider(("kmeans",), "faiss-kmeans", "faiss.Kmeans(d, K, niter=iters, k-means++ init, no subsampling) + assignment")
def faiss_kmeans(case: Case, data: Data):
    faiss, x = _faiss(data), data.x.numpy()
    options = {"niter": case.iters, "seed": 0, "verbose": False,  # every point used, none warned about
               "max_points_per_centroid": case.n, "min_points_per_centroid": 1}
    if hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS"):  # k-means++ where this faiss has it
        options["init_method"] = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS

    def run():
        kmeans = faiss.Kmeans(case.d, case.k, **options)
        kmeans.train(x)
        return torch.from_numpy(kmeans.centroids), _nearest(kmeans.index, data.x)
    return run


@provider(("kmeans",), "sklearn-kmeans", "sklearn.cluster.KMeans(K, init='k-means++', max_iter=iters, n_init=1, "
                                         "algorithm='lloyd', tol=0) + its final assignment (labels_)")
def sklearn_kmeans(case: Case, data: Data):
    if data.x.device.type != "cpu" or data.x.dtype != torch.float32:
        raise Absent("scikit-learn takes float32 CPU arrays only")
    cluster, threadpoolctl = _import("sklearn.cluster"), _import("threadpoolctl")
    x = data.x.numpy()

    def run():
        with threadpoolctl.threadpool_limits(torch.get_num_threads()):
            kmeans = cluster.KMeans(case.k, init="k-means++", max_iter=case.iters, n_init=1, algorithm="lloyd", tol=0.0,
                                    random_state=0).fit(x)
        return torch.from_numpy(kmeans.cluster_centers_), torch.from_numpy(kmeans.labels_).long()
    return run


def _train_step(module: torch.nn.Module, data: Data):
    x = data.x.clone().requires_grad_(True)  # a leaf, like an encoder's output

    def run():
        x.grad = None
        quantized, indices, loss = module(x)
        torch.autograd.backward([quantized, loss], [data.grad_out, torch.ones_like(loss)])
        return quantized, indices, loss, x
    return run


@provider(("train",), "vector-quantize-pytorch",
          "vector_quantize_pytorch.VectorQuantize(dim, K): its defaults (EMA, rotation trick)")
def vector_quantize_pytorch(case: Case, data: Data):
    module = _import("vector_quantize_pytorch").VectorQuantize(case.d, case.k).to(data.x.device).train()
    state = module._codebook  # the same start as FastVectorQuantizer.set_codebook
    with torch.no_grad():
        state.embed.copy_(data.codebook.reshape(state.embed.shape))
        state.embed_avg.copy_(data.codebook.reshape(state.embed_avg.shape))
        state.cluster_size.fill_(1.0)
    return _train_step(module, data)


def fastvq_setup(case: Case, data: Data, backend: str):
    """fastvq.quantize, a FastVectorQuantizer training step, or fastvq.kmeans, on ``backend`` (a backend that
    cannot run here raises BackendNotSupportedError at the first run: absent)."""
    if backend == "triton" and data.x.device.type == "cpu":
        raise Absent("triton runs CPU tensors only in its interpreter, which is not a performance path")
    if case.workload == "nearest_code":
        return lambda: fastvq.quantize(data.x, data.codebook, backend=backend)
    if case.workload == "nearest_codes":
        return lambda: fastvq.nearest_codes(data.x, data.codebook, TOPK, backend=backend)[0]
    if case.workload == "kmeans":
        return lambda: fastvq.kmeans(data.x, case.k, iters=case.iters, seed=0, init="kmeans++", backend=backend)
    module = fastvq.FastVectorQuantizer(case.d, case.k, backend=backend).to(data.x.device).train()
    module.set_codebook(data.codebook)
    return _train_step(module, data)


FASTVQ = {"nearest_code": "fastvq.quantize(x, codebook, backend={!r}): fused search + gather",
          "nearest_codes": f"fastvq.nearest_codes(x, codebook, {TOPK}, backend={{!r}}): fused top-k search",
          "train": "fastvq.FastVectorQuantizer(dim, K, backend={!r}): vqp's defaults (EMA, rotation trick)",
          "kmeans": "fastvq.kmeans(x, K, iters=iters, init='kmeans++', backend={!r})"}
for backend in [*fastvq.available_backends(), *fastvq.unavailable_reasons()]:
    for workload, text in FASTVQ.items():
        provider((workload,), f"fastvq-{backend}", text.format(backend), "fastvq", opt_in=backend == "torch")(
            partial(fastvq_setup, backend=backend))


@provider(("nearest_code",), "fastvq-triton-gluon", "fastvq.quantize(x, codebook, backend='triton') with "
          "fastvq.triton.set_search_kernel('gluon'): the pipelined-wgmma bf16 search (Hopper, d <= 64)", "fastvq")
def fastvq_triton_gluon(case: Case, data: Data):
    kernels = _import("fastvq.triton")
    why = kernels.gluon_search_reason(data.x, data.codebook)
    if why is not None:
        raise Absent(why)

    def run():
        kernels.set_search_kernel("gluon")
        try:
            return fastvq.quantize(data.x, data.codebook, backend="triton")
        finally:
            kernels.set_search_kernel(None)
    return run


@provider(("nearest_code",), "fastvq-cpu-float32", "fastvq.quantize(x, codebook, backend='cpu') with "
          "fastvq._cpu.set_prefilter('off'): the float32 search alone, without the int8 prefilter", "fastvq")
def fastvq_cpu_float32(case: Case, data: Data):
    if data.x.device.type != "cpu":
        raise Absent("the cpu backend's prefilter switch: CPU tensors only")
    cpu = _import("fastvq._cpu")
    why_not = cpu.prefilter_reason(case.n, case.k, case.d)
    if why_not:
        raise Absent("fastvq-cpu runs without the prefilter here already: " + why_not)

    def run():
        cpu.set_prefilter("off")
        try:
            return fastvq.quantize(data.x, data.codebook, backend="cpu")
        finally:
            cpu.set_prefilter("auto")
    return run


RESIDUAL = ("rvq_train", "rvq_beam")


def _residual_run(module: torch.nn.Module, case: Case, data: Data):
    """One ResidualVQ training step (greedy, vqp's defaults) or one beam-search encode (eval, no grad) of the
    case's N frames as one sequence (1, N, d)."""
    if case.workload == "rvq_beam":
        module.eval()
        x = data.x.view(1, case.n, case.d)

        def encode():
            with torch.no_grad():
                return module(x, beam_size=case.beam)
        return encode
    module.train()
    x = data.x.clone().view(1, case.n, case.d).requires_grad_(True)
    grad_out = data.grad_out.view(1, case.n, case.d)

    def step():
        x.grad = None
        quantized, indices, losses = module(x)
        torch.autograd.backward([quantized, losses], [grad_out, torch.ones_like(losses)])
        return quantized, indices, losses, x
    return step


@provider(RESIDUAL, "vector-quantize-pytorch",
          "vector_quantize_pytorch.ResidualVQ(dim, num_quantizers, K): its defaults (EMA, rotation trick)")
def vector_quantize_pytorch_residual(case: Case, data: Data):
    module = _import("vector_quantize_pytorch").ResidualVQ(dim=case.d, num_quantizers=case.levels,
                                                           codebook_size=case.k).to(data.x.device)
    with torch.no_grad():  # every level starts from the case's codebook, as fastvq's set_codebook starts it
        for layer in module.layers:
            state = layer._codebook
            state.embed.copy_(data.codebook.reshape(state.embed.shape))
            state.embed_avg.copy_(data.codebook.reshape(state.embed_avg.shape))
            state.cluster_size.fill_(1.0)
    return _residual_run(module, case, data)


def fastvq_residual_setup(case: Case, data: Data, backend: str):
    if backend == "triton" and data.x.device.type == "cpu":
        raise Absent("triton runs CPU tensors only in its interpreter, which is not a performance path")
    module = fastvq.ResidualVQ(dim=case.d, num_quantizers=case.levels, codebook_size=case.k, backend=backend)
    module = module.to(data.x.device)
    for layer in module.layers:
        layer.set_codebook(data.codebook)
    return _residual_run(module, case, data)


for backend in [*fastvq.available_backends(), *fastvq.unavailable_reasons()]:
    provider(RESIDUAL, f"fastvq-{backend}", f"fastvq.ResidualVQ(dim, num_quantizers, K, backend={backend!r}): "
             f"vqp's defaults; beam search on fastvq.nearest_codes", "fastvq", opt_in=backend == "torch")(
        partial(fastvq_residual_setup, backend=backend))


def select(spec: str | None) -> dict[str, list[Provider]]:
    """--providers a,b: these (and always the sgemm yardstick), per workload; None: all but the opt-in ones."""
    names = {name for _, name in REGISTRY}
    wanted = None if spec is None else {n.strip() for n in spec.split(",") if n.strip()}
    if wanted is not None and (not wanted or wanted - names):
        raise ValueError(f"--providers must be a comma-separated subset of {sorted(names)}, got {spec!r}")
    keep = (lambda p: not p.opt_in) if wanted is None else (lambda p: p.role == "sgemm" or p.name in wanted)
    return {w: [p for p in REGISTRY.values() if p.workload == w and keep(p)] for w in WORKLOADS}
