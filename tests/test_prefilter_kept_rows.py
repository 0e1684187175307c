"""The int8 rows a hinted search keeps for the next search of the same x (csrc/cpu/prefilter_rows.cpp): k-means
searches its x against each iteration's centroids, so the rows are quantized once. The outputs never depend on
it: every test compares bitwise with the float32 search, and checks through prefilter_stats whether the rows were
reused, so a change to x, to the search centre or to the scan's layout must make the call quantize afresh."""
from __future__ import annotations

import pytest
import torch

import fastvq
from fastvq import _cpu, ops
from fastvq.backends.cpu import cache_key

from test_cpu_prefilter import KERNELS, NO_INT8_SCAN

pytestmark = pytest.mark.skipif(NO_INT8_SCAN, reason="this CPU or build has no int8 scan: no prefilter to test")

N, K, D = 2048, 2048, 64  # enough rows to keep (>= 1024), and codes for either scan under "auto"


@pytest.fixture(params=KERNELS)
def kernel(request):
    _cpu.empty_cache()
    _cpu.set_prefilter_kernel(request.param)
    yield request.param
    _cpu.set_prefilter("auto")
    _cpu.set_prefilter_kernel("auto")
    _cpu.empty_cache()


def inputs(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randn(K, D, generator=g)


def search(x, codebook, hint, rows_key):
    """(indices, sqdist, quantized) and whether the call took kept rows."""
    n = x.shape[0]
    out = torch.empty(n, dtype=torch.int64), torch.empty(n), torch.empty(n, D)
    before = _cpu.prefilter_stats()
    _cpu.nearest_code(x, codebook, *out, 2, cache_key=cache_key(codebook), hint=hint, rows_key=rows_key)
    after = _cpu.prefilter_stats()
    assert after["calls"] == before["calls"] + 1, "the prefilter did not answer"
    return out, after["kept_rows_calls"] - before["kept_rows_calls"]


def float32_search(x, codebook):
    _cpu.set_prefilter("off")
    try:
        n = x.shape[0]
        out = torch.empty(n, dtype=torch.int64), torch.empty(n), torch.empty(n, D)
        _cpu.nearest_code(x, codebook, *out, 2)
        return out
    finally:
        _cpu.set_prefilter("auto")


def assert_same(got, want):
    for name, a, b in zip(("indices", "sqdist", "quantized"), got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_kept_rows_serve_a_sequence_of_codebooks_bitwise(kernel):
    x, codebook = inputs()
    hint = float32_search(x, codebook)[0]
    reused = []
    for step in range(4):  # k-means-like: the codebook moves a little each time, x stays
        codebook = codebook + 0.05 * torch.randn(codebook.shape, generator=torch.Generator().manual_seed(step))
        got, kept = search(x, codebook, hint, cache_key(x))
        assert_same(got, float32_search(x, codebook))
        reused.append(kept)
        hint = got[0]
    assert reused == [0, 1, 1, 1]


def test_without_a_hint_or_a_key_nothing_is_kept(kernel):
    x, codebook = inputs()
    hint = float32_search(x, codebook)[0]
    for _ in range(2):
        assert search(x, codebook, None, cache_key(x))[1] == 0
        assert search(x, codebook, hint, [])[1] == 0
    small = x[:1000].clone()  # below 1024 rows
    for _ in range(2):
        assert search(small, codebook, hint[:1000], cache_key(small))[1] == 0


def write_other_rows(x, codebook, kernel):
    x.copy_(inputs(seed=1)[0])  # in place: the kept levels would list the wrong candidates
    return x, codebook


def move_the_centre(x, codebook, kernel):
    return x, codebook + 3.0  # the search centre (the codes' mean on a power-of-two grid) moves by 3


def switch_the_layout(x, codebook, kernel):
    if len(KERNELS) < 2:
        pytest.skip("one scan kernel here: one layout")
    # amx and vnni lay the rows out differently; avx2 and vnni share the layout but not the levels' range
    _cpu.set_prefilter_kernel(next(other for other in KERNELS if other != kernel))
    return x, codebook


@pytest.mark.parametrize("change", [write_other_rows, move_the_centre, switch_the_layout])
def test_a_change_the_kept_rows_do_not_fit_is_seen(kernel, change):
    x, codebook = inputs()
    hint = float32_search(x, codebook)[0]
    search(x, codebook, hint, cache_key(x))
    x, codebook = change(x, codebook, kernel)
    got, kept = search(x, codebook, hint, cache_key(x))
    assert_same(got, float32_search(x, codebook))
    assert kept == 0


def test_empty_cache_releases_the_kept_rows(kernel):
    x, codebook = inputs()
    hint = float32_search(x, codebook)[0]
    search(x, codebook, hint, cache_key(x))
    assert _cpu.empty_cache() >= N * D  # one byte a level at least
    assert search(x, codebook, hint, cache_key(x))[1] == 0
    assert search(x, codebook, hint, cache_key(x))[1] == 1


def test_release_drops_the_rows_kept_under_that_key_only(kernel):
    x, codebook = inputs()
    hint = float32_search(x, codebook)[0]
    key = cache_key(x)
    search(x, codebook, hint, key)
    assert _cpu.release_rows(key[:1] + [-1] + key[2:]) == 0  # another key: kept
    assert search(x, codebook, hint, key)[1] == 1
    assert _cpu.release_rows(key) >= N * D
    assert _cpu.release_rows(key) == 0
    assert search(x, codebook, hint, key)[1] == 0


def test_kmeans_reuses_its_rows_and_gets_the_same_result(kernel):
    x = inputs(n=3000)[0]
    before = _cpu.prefilter_stats()["kept_rows_calls"]
    kept = fastvq.kmeans(x, K, iters=4, seed=0)
    reused = _cpu.prefilter_stats()["kept_rows_calls"] - before
    # 5 searches: the first has no hint, the second keeps the rows, the 3 others reuse them
    assert reused == 3
    _cpu.set_prefilter("off")
    assert all(torch.equal(a, b) for a, b in zip(kept, fastvq.kmeans(x, K, iters=4, seed=0)))


def test_the_backend_keys_the_rows_of_a_hinted_search_only():
    x, codebook = inputs()
    if _cpu.prefilter_reason(N, K, D):
        pytest.skip(_cpu.prefilter_reason(N, K, D))
    _cpu.empty_cache()
    hint = ops.nearest_code(x, codebook, "cpu", None)[0]
    before = _cpu.prefilter_stats()["kept_rows_calls"]
    for _ in range(3):
        ops.nearest_code(x, codebook, "cpu", None)
    assert _cpu.prefilter_stats()["kept_rows_calls"] == before
    for _ in range(3):
        ops.nearest_code(x, codebook, "cpu", hint)
    assert _cpu.prefilter_stats()["kept_rows_calls"] == before + 2
    _cpu.empty_cache()
