"""``python -m fastvq.bench``: fastvq against naive PyTorch, faiss-cpu and vector-quantize-pytorch, on CPU or CUDA.

cases (workloads, sweeps, tensors) -> providers (one setup function each) -> run (judge: correctness
first; timing: alternated rounds; memory: child processes) -> report (rich table, markdown, JSON),
plot; check is --check; machine says which machine (and caps the ISA); cli ties them together.
Nothing here is imported by ``import fastvq``.
"""
