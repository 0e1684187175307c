"""Search-forward providers: x (N, d), codebook (K, d) -> indices (N,) and quantized = codebook[indices].

Everything a provider builds once per codebook (a faiss index) is built in
``prepare`` and not timed; the squared norms of the codebook are recomputed inside
the timed call, since a training codebook changes every step. Runs are under
``torch.no_grad()``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .providers import Check, Provider, Runner, fastvq_backend_reason, fastvq_backends, import_reason
from .verify import ExactOracle, Oracle, judge, judge_gather, recall_rows
from .workloads import CaseData
from .isa import limit_faiss

# faiss's IVF index is shown for large codebooks only, where an approximate search is a real option.
IVF_MIN_CODES = 65536
# Its nprobe is the smallest power of two reaching this recall@1 on a tuning sample of rows
# (disjoint in general from the rows its reported recall is measured on).
IVF_TARGET_RECALL = 0.9
IVF_TUNING_ROWS = 512

class SearchRunner(Runner):
    """Subclasses implement ``search() -> (indices, quantized)``."""

    def __init__(self, data: CaseData, approximate: bool = False):
        self.x, self.codebook, self.approximate = data.x, data.codebook, approximate

    def search(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __call__(self) -> None:
        with torch.no_grad():
            self.search()

    def checked_run(self, rows: Tensor, oracle: Oracle) -> Check:
        with torch.no_grad():
            indices, quantized = self.search()
        if self.approximate:  # recall@1 on more rows, against an exact float64 search
            rows, oracle = recall_rows(self.x.shape[0]), ExactOracle()
        verdict = judge(self.x, self.codebook, indices, rows, oracle)
        if not verdict.message and not self.approximate:
            verdict.message = judge_gather(quantized, self.codebook, indices, rows)
        extra = {"recall_at_1": verdict.recall, **getattr(self, "extra", {})} if self.approximate else {}
        return Check(verdict, extra)


class _Sgemm(SearchRunner):
    def __init__(self, data: CaseData):
        super().__init__(data)
        self.out = torch.empty(data.x.shape[0], data.codebook.shape[0])

    def search(self):
        torch.mm(self.x, self.codebook.T, out=self.out)
        return None, None

    def checked_run(self, rows, oracle):
        self()
        return Check(None)


class Sgemm(Provider):
    """Timed in every case of every workload, alternating with the others, for the % sgemm column."""

    name, role = "sgemm", "sgemm"
    description = "torch.mm(x, codebook.T) into a preallocated N×K output: the machine's sgemm yardstick"

    def __init__(self, workload: str = "search"):
        self.workload = workload

    def prepare(self, case, data):
        return _Sgemm(data)


class _Naive(SearchRunner):
    def search(self):
        indices = torch.cdist(self.x, self.codebook).argmin(1)
        return indices, self.codebook[indices]


class Naive(Provider):
    name, workload = "naive", "search"
    description = "torch.cdist + argmin + gather"

    def prepare(self, case, data):
        return _Naive(data)


class _Addmm(SearchRunner):
    def search(self):
        codebook_sq = (self.codebook * self.codebook).sum(1)
        indices = torch.addmm(codebook_sq, self.x, self.codebook.T, alpha=-2.0).argmin(1)
        return indices, self.codebook[indices]


class Addmm(Provider):
    name, workload = "addmm", "search"
    description = "torch.addmm(‖e‖², x, eᵀ, alpha=−2) + argmin + gather"

    def prepare(self, case, data):
        return _Addmm(data)


class _Faiss(SearchRunner):
    def __init__(self, data: CaseData, index, approximate: bool):
        super().__init__(data, approximate)
        self.index = index
        self.x_numpy = data.x.numpy()

    def search(self):
        _, found = self.index.search(self.x_numpy, 1)
        indices = torch.from_numpy(found[:, 0])
        return indices, self.codebook[indices]


def _faiss_threads():
    import faiss

    limit_faiss(faiss)
    faiss.omp_set_num_threads(torch.get_num_threads())
    return faiss


class FaissFlat(Provider):
    name, workload = "faiss-flat", "search"
    description = "faiss-cpu IndexFlatL2, k=1 (exact), + gather"

    def absent_reason(self, case, data):
        return import_reason("faiss")

    def prepare(self, case, data):
        faiss = _faiss_threads()
        index = faiss.IndexFlatL2(case.d)
        index.add(data.codebook.numpy())
        return _Faiss(data, index, approximate=False)


class FaissIVF(Provider):
    name, workload, role = "faiss-ivf", "search", "approximate"
    description = (f"faiss-cpu IndexIVFFlat, nlist≈4√K, nprobe tuned to recall@1 >= {IVF_TARGET_RECALL} "
                   "(approximate; recall@1 vs exact shown)")

    def __init__(self, min_codes: int = IVF_MIN_CODES, target_recall: float = IVF_TARGET_RECALL):
        self.min_codes, self.target_recall = min_codes, target_recall

    def absent_reason(self, case, data):
        if case.k < self.min_codes:
            return f"not applicable: IVF is shown for K >= {self.min_codes}"
        return import_reason("faiss")

    def prepare(self, case, data):
        faiss = _faiss_threads()
        nlist = ivf_nlist(case.k)
        coarse = faiss.IndexFlatL2(case.d)
        index = faiss.IndexIVFFlat(coarse, case.d, nlist, faiss.METRIC_L2)
        index.cp.seed = 0
        index.train(data.codebook.numpy())
        index.add(data.codebook.numpy())
        index.nprobe = self.tune_nprobe(index, nlist, data)
        runner = _Faiss(data, index, approximate=True)
        runner.extra = {"nprobe": index.nprobe, "nlist": nlist}
        return runner

    def tune_nprobe(self, index, nlist: int, data: CaseData) -> int:
        """Smallest power-of-two nprobe with recall@1 >= target on a seeded random sample of rows."""
        generator = torch.Generator().manual_seed(1)
        rows = torch.randperm(data.x.shape[0], generator=generator)[:IVF_TUNING_ROWS].sort().values
        sample = data.x[rows]
        exact = ExactOracle().indices(sample, data.codebook)
        nprobe = 1
        while nprobe < nlist:
            index.nprobe = nprobe
            _, found = index.search(sample.numpy(), 1)
            verdict = judge(sample, data.codebook, torch.from_numpy(found[:, 0]), torch.arange(len(rows)),
                            _Fixed(exact))
            if verdict.recall >= self.target_recall:
                break
            nprobe *= 2
        return min(nprobe, nlist)


class _Fixed(Oracle):
    """An oracle whose answers are already known."""

    def __init__(self, indices: Tensor):
        super().__init__()
        self._indices = indices

    def indices(self, x_rows, codebook):
        return self._indices


def ivf_nlist(num_codes: int) -> int:
    """About 4·√K lists, a power of two, with >= 39 training codes per list (faiss's minimum)."""
    nlist = 2 ** round(math.log2(max(1.0, 4.0 * math.sqrt(num_codes))))
    return max(1, min(nlist, num_codes // 39))


class _Fastvq(SearchRunner):
    def __init__(self, data: CaseData, backend: str):
        super().__init__(data)
        self.backend = backend

    def search(self):
        from .. import functional

        quantized, indices = functional.quantize(self.x, self.codebook, backend=self.backend)
        return indices, quantized


class FastvqSearch(Provider):
    workload, role = "search", "fastvq"

    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"fastvq-{backend}"
        self.description = f"fastvq.quantize(x, codebook, backend={backend!r}): fused search + gather"
        self.opt_in = backend == "torch"

    def absent_reason(self, case, data):
        return fastvq_backend_reason(self.backend, data.x, data.codebook)

    def prepare(self, case, data):
        return _Fastvq(data, self.backend)


def providers() -> list[Provider]:
    return [Sgemm(), Naive(), Addmm(), FaissFlat(), FaissIVF()] + [FastvqSearch(b) for b in fastvq_backends()]
