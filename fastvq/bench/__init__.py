"""``python -m fastvq.bench``: fastvq against naive PyTorch, faiss-cpu and vector-quantize-pytorch.

Layers, one module each:

    workloads.py         the workloads, the named shapes of the default and --quick sweeps, seeded tensors
    providers.py         what a provider is; the registry and --providers selection
    search_providers.py  sgemm yardstick, naive cdist, addmm, faiss IndexFlatL2 / IVF, fastvq-<backend>
    train_providers.py   vector-quantize-pytorch's VectorQuantize and FastVectorQuantizer, one EMA training step
    kmeans_providers.py  faiss.Kmeans and fastvq.kmeans
    verify.py            correctness before timing: indices against fastvq.reference, judged by distance
    timing.py            warm-up, then rounds alternating providers run by run; median and spread
    memory.py            peak RSS of one provider on one case, in a child process of its own
    machine.py           CPU model, cores, ISA flags, versions, threads, load
    run.py               one case end to end
    report.py            GFLOP/s, % sgemm, ratios, targets; rich table; JSON
    plot.py              --plot: time vs K, log-log, one panel per workload
    cli.py               the command line

Importing this package imports neither faiss nor vector_quantize_pytorch; providers import them when used.
"""
from .cli import main

__all__ = ["main"]
