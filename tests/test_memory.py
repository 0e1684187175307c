"""Memory bound: an EMA training step at N=16384, K=65536, d=32 peaks under 1 GiB RSS.

A dense N×K float32 distance matrix alone would take 4 GiB. The step runs in a fresh
subprocess so the peak RSS is that step's, including the interpreter and torch; a second
subprocess that only imports gives the baseline, and the difference is reported.
The peak is VmHWM from /proc/self/status, the high-water mark of the child's own address
space: ru_maxrss would also carry the pytest parent's size across fork and exec.
"""
from __future__ import annotations

import subprocess
import sys

import torch

from conftest import backend_or_skip

NUM_ROWS, NUM_CODES, DIM = 16384, 65536, 32
GIB = 1 << 30

PRINT_PEAK_RSS = """
with open("/proc/self/status") as status:
    print(next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")))
"""

IMPORT_ONLY = """
import torch, fastvq
""" + PRINT_PEAK_RSS

EMA_TRAINING_STEP = f"""
import torch, fastvq
torch.manual_seed(0)
module = fastvq.FastVectorQuantizer({DIM}, {NUM_CODES}, backend="cpu").train()
x = torch.randn({NUM_ROWS}, {DIM}, requires_grad=True)
quantized, indices, loss = module(x)
(quantized.square().sum() + loss).backward()
assert indices.shape == ({NUM_ROWS},) and x.grad.shape == x.shape
assert not torch.equal(module._codebook.cluster_size, torch.ones(1, {NUM_CODES}))  # the EMA update ran
""" + PRINT_PEAK_RSS


def peak_rss_bytes(code: str) -> int:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().splitlines()[-1])


def test_ema_training_step_peak_rss_under_1_gib(record_property):
    backend_or_skip("cpu", torch.empty(1, 1))
    baseline = peak_rss_bytes(IMPORT_ONLY)
    peak = peak_rss_bytes(EMA_TRAINING_STEP)
    record_property("import_only_peak_rss_mib", round(baseline / 2**20, 1))
    record_property("ema_step_peak_rss_mib", round(peak / 2**20, 1))
    print(f"\npeak RSS: import only {baseline / 2**20:.0f} MiB, EMA training step {peak / 2**20:.0f} MiB "
          f"(+{(peak - baseline) / 2**20:.0f} MiB); a dense N x K float32 matrix would be "
          f"{NUM_ROWS * NUM_CODES * 4 / GIB:.0f} GiB")
    assert peak < GIB, f"EMA training step peaked at {peak / 2**20:.0f} MiB (import only: {baseline / 2**20:.0f} MiB)"
