"""k-means providers: x (N, d) -> (centroids (K, d), assignments (N,)), Lloyd, the same iterations.

Both start from k-means++ seeding (faiss's ClusteringInitMethod_KMEANS_PLUS_PLUS
where this faiss has it) and use every point (faiss's subsampling is turned off).
A run includes the final assignment pass, since fastvq.kmeans returns assignments
too. The check judges the assignments against the returned centroids; the inertia
Σ min_k ‖x_i − c_k‖² of the returned centroids is reported beside the time.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .providers import Check, Provider, Runner, fastvq_backend_reason, fastvq_backends, import_reason
from .search_providers import Sgemm
from .verify import Oracle, exact_inertia, judge
from .workloads import Case, CaseData
from .isa import limit_faiss

SEED = 0


class KmeansRunner(Runner):
    def __init__(self, case: Case, data: CaseData):
        self.case, self.x = case, data.x

    def fit(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __call__(self) -> None:
        self.fit()

    def checked_run(self, rows: Tensor, oracle: Oracle) -> Check:
        centroids, assignments = self.fit()
        centroids = torch.as_tensor(centroids).reshape(self.case.k, self.case.d).float()
        verdict = judge(self.x, centroids, torch.as_tensor(assignments).reshape(-1), rows, oracle)
        return Check(verdict, {"inertia": exact_inertia(self.x, centroids)})


class _Faiss(KmeansRunner):
    def __init__(self, case, data):
        super().__init__(case, data)
        import faiss

        limit_faiss(faiss)
        faiss.omp_set_num_threads(torch.get_num_threads())
        self.faiss = faiss
        self.x_numpy = data.x.numpy()
        self.options = {"niter": case.iters, "seed": SEED, "verbose": False,
                        # every point is used (no subsampling), and small N is not warned about
                        "max_points_per_centroid": max(1, case.n), "min_points_per_centroid": 1}
        if hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS") and hasattr(faiss.ClusteringParameters(), "init_method"):
            self.options["init_method"] = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS

    def fit(self):
        kmeans = self.faiss.Kmeans(self.case.d, self.case.k, **self.options)
        kmeans.train(self.x_numpy)
        _, assignments = kmeans.index.search(self.x_numpy, 1)
        return torch.from_numpy(kmeans.centroids), torch.from_numpy(assignments[:, 0])


class FaissKmeans(Provider):
    name, workload = "faiss-kmeans", "kmeans"
    description = "faiss.Kmeans(d, K, niter=iters, k-means++ init, no subsampling) + final assignment search"

    def absent_reason(self, case, data):
        if case.k > case.n:
            return f"not applicable: K={case.k} > N={case.n}"
        return import_reason("faiss")

    def prepare(self, case, data):
        return _Faiss(case, data)


class _Fastvq(KmeansRunner):
    def __init__(self, case, data, backend):
        super().__init__(case, data)
        self.backend = backend

    def fit(self):
        return fastvq_kmeans()(self.x, self.case.k, iters=self.case.iters, seed=SEED, init="kmeans++",
                               backend=self.backend)


def fastvq_kmeans():
    """fastvq.kmeans(x, k, *, iters, seed, init, backend), or None if this fastvq has none."""
    import importlib

    import fastvq

    found = getattr(fastvq, "kmeans", None)
    if found is None:
        try:
            found = importlib.import_module("fastvq.kmeans")
        except ImportError:
            return None
    if not callable(found):  # the fastvq.kmeans module, before fastvq/__init__ exports the function
        found = getattr(found, "kmeans", None)
    return found if callable(found) else None


class FastvqKmeans(Provider):
    workload, role = "kmeans", "fastvq"

    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"fastvq-{backend}"
        self.description = f"fastvq.kmeans(x, K, iters=iters, init='kmeans++', backend={backend!r})"
        self.opt_in = backend == "torch"

    def absent_reason(self, case, data):
        if fastvq_kmeans() is None:
            return "fastvq.kmeans does not exist in this version of fastvq"
        if case.k > case.n:
            return f"not applicable: K={case.k} > N={case.n}"
        return fastvq_backend_reason(self.backend, data.x)

    def prepare(self, case, data):
        return _Fastvq(case, data, self.backend)


def providers() -> list[Provider]:
    return [Sgemm("kmeans"), FaissKmeans()] + [FastvqKmeans(b) for b in fastvq_backends()]
