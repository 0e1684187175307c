"""nearest_code's ``hint`` (ops.nearest_code(x, codebook, backend, hint)): a guess of each row's code that
the cpu backend's int8 prefilter starts from (k-means passes the last assignment). It never changes the
outputs, on any backend; the prefilter's own hint tests are in test_cpu_prefilter.py."""
from __future__ import annotations

import pytest
import torch

import fastvq
from fastvq import ops

from conftest import randn, skip_if_slow


@pytest.mark.parametrize("num_rows,num_codes,dim", [(0, 3, 33), (1, 1, 1), (3, 257, 64), (33, 1030, 33),
                                                    (257, 2048, 64), (1030, 1030, 64)])
def test_a_hint_never_changes_the_outputs(pair, num_rows, num_codes, dim):
    skip_if_slow(pair, num_rows, num_codes, dim)
    x, codebook = pair.to(randn(num_rows, dim, seed=num_rows + dim), randn(num_codes, dim, seed=num_codes))
    pair.require(x, codebook)
    indices, sqdist = ops.nearest_code(x, codebook, pair.backend)
    hints = [indices, (num_codes - 1) - indices, torch.zeros_like(indices),
             torch.stack([indices, indices], 1)[:, 1]]  # the last one a strided view
    for hint in hints:
        hinted = ops.nearest_code(x, codebook, pair.backend, hint)
        torch.testing.assert_close(hinted, (indices, sqdist), rtol=0, atol=0)


@pytest.mark.parametrize("hint,pattern", [
    (torch.zeros(5, dtype=torch.int32), r"hint must be an int64 tensor of shape \(5,\) on cpu, got torch.int32"),
    (torch.zeros(5), r"hint must be an int64 tensor .* got torch.float32"),
    (torch.zeros(4, dtype=torch.int64), r"hint must be an int64 tensor of shape \(5,\) .* of shape \(4,\)"),
    (torch.zeros(5, 1, dtype=torch.int64), r"of shape \(5, 1\)"),
    (torch.tensor([0, 1, 2, 3, 7]), r"hint must hold codes in \[0, 7\), got values in \[0, 7\]"),
    (torch.tensor([0, -1, 2, 3, 4]), r"hint must hold codes in \[0, 7\), got values in \[-1, 4\]"),
])
def test_a_bad_hint_raises_naming_it(hint, pattern):
    with pytest.raises(ValueError, match=pattern):
        ops.nearest_code(torch.randn(5, 8), torch.randn(7, 8), "auto", hint)
    with pytest.raises(ValueError, match=pattern):
        fastvq.nearest_code(torch.randn(5, 8), torch.randn(7, 8), hint=hint)


def test_the_public_function_takes_the_hint_and_checks_its_type():
    x, codebook = torch.randn(40, 16), torch.randn(300, 16)
    indices, sqdist = fastvq.nearest_code(x, codebook)
    hinted = fastvq.nearest_code(x, codebook, hint=torch.zeros(40, dtype=torch.int64))
    torch.testing.assert_close(hinted, (indices, sqdist), rtol=0, atol=0)
    with pytest.raises(TypeError, match="hint must be a torch.Tensor or None, got list"):
        fastvq.nearest_code(x, codebook, hint=[0] * 40)
