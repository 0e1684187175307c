"""``python -m fastvq.bench`` (cli.py): cases (workloads, sweeps, tensors) -> providers (one setup function each)
-> judge (correctness first; --check) -> run (alternated timing rounds, memory in child processes) -> report
(derived figures, tables, markdown, plot, the machine). Nothing here is imported by ``import fastvq``."""
