"""The cpu kernels' packed-codebook cache (csrc/cpu/pack_codebook.h, keys from fastvq.backends.cpu.cache_key):
a repeated search reuses the pack, every in-place change of the codebook is seen, the cache is bounded
and released by fastvq.empty_cache(), and concurrent threads are safe.

Inputs are small integers, so every answer is exact and compared index for index with the reference.
"""
from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

import fastvq
from fastvq import reference
from fastvq.backends import cpu

from conftest import small_integers

pytestmark = pytest.mark.skipif(cpu._cpu is None, reason="fastvq._cpu is not built")


def exact_pair(num_rows, num_codes, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    return small_integers(num_rows, dim, generator=generator), small_integers(num_codes, dim, generator=generator)


def assert_exact(x, codebook, k=None):
    """nearest_code (and nearest_codes with k) on the cpu backend equal the reference, index for index."""
    indices, _ = fastvq.nearest_code(x, codebook, backend="cpu")
    assert torch.equal(indices, reference.nearest_code(x.double(), codebook.double())[0])
    if k is not None:
        top, _ = fastvq.nearest_codes(x, codebook, k, backend="cpu")
        assert torch.equal(top, reference.nearest_codes(x.double(), codebook.double(), k)[0])


def test_a_repeated_search_hits_the_cache_and_every_in_place_change_is_seen():
    fastvq.empty_cache()
    x, codebook = exact_pair(300, 1030, 16, seed=0)
    assert_exact(x, codebook, k=5)
    held = cpu._cpu.pack_cache_bytes()
    assert held > 0
    key = cpu.cache_key(codebook)
    assert cpu.cache_key(codebook) == key  # unchanged tensor: the same key, so the pack is reused
    assert_exact(x, codebook, k=5)
    assert cpu._cpu.pack_cache_bytes() == held  # a hit packs nothing new
    for change in (lambda e: e.add_(1.0), lambda e: e[7].copy_(x[0]), lambda e: e[::3].mul_(-1.0),
                   lambda e: e.view(-1)[5:9].fill_(2.0)):
        change(codebook)  # in place, through the tensor or a view: the version counter moves
        assert cpu.cache_key(codebook) != key
        key = cpu.cache_key(codebook)
        assert_exact(x, codebook, k=5)


def test_views_of_one_codebook_and_new_tensors_at_a_reused_address():
    x, _ = exact_pair(50, 8, 6, seed=1)
    stacked = small_integers(3, 257, 6, generator=torch.Generator().manual_seed(2))
    for c in range(3):  # each view (as the module passes codebook[c]) is its own codebook
        assert_exact(x, stacked[c], k=3)
    for seed in range(6):  # fresh tensors that may land where a freed one was, with version 0
        codebook = small_integers(257, 6, generator=torch.Generator().manual_seed(10 + seed))
        assert_exact(x, codebook)
        del codebook


def test_writes_through_data_need_empty_cache_and_the_module_counts_its_own():
    x, codebook = exact_pair(64, 300, 8, seed=3)
    assert_exact(x, codebook)
    codebook.data.copy_(small_integers(300, 8, generator=torch.Generator().manual_seed(4)))
    fastvq.empty_cache()  # the documented step after a write that bypasses the version counter
    assert_exact(x, codebook)
    # FastVectorQuantizer writes its codebook through .data (EMA update, k-means init, dead codes) and
    # counts those writes, so an eval search after a training step sees the new codebook.
    # decay 0: the codes the batch x + 40 picks jump onto it and the others collapse to 0, so each training
    # step changes the eval answer.
    for options in ({}, {"kmeans_init": True}, {"threshold_ema_dead_code": 2}):
        torch.manual_seed(0)
        module = fastvq.FastVectorQuantizer(8, 300, decay=0.0, backend="cpu", **options)
        before = None
        for step in range(2):
            module.eval()
            _, indices, _ = module(x.unsqueeze(0))
            embed = module._codebook.embed.detach().reshape(300, 8)
            reference.assert_nearest(x, embed, indices.reshape(-1))
            assert before is None or not torch.equal(indices, before), (options, step)
            before = indices
            module.train()
            module((x + 40.0 * (step + 1)).unsqueeze(0))


def test_the_last_key_is_reused_only_for_the_same_tensor_unchanged():
    """cache_key remembers the last codebook's key (a weak reference, its version, data pointer, dtype, shape
    and strides). A .data assignment that keeps the data pointer but changes the shape, the strides or the
    dtype gets a new key and the new codebook's answers, and the memory does not keep the tensor alive."""
    x, _ = exact_pair(40, 8, 16, seed=11)
    base = small_integers(600, 16, generator=torch.Generator().manual_seed(12))
    codebook = base[:300].clone()
    assert_exact(x, codebook)
    assert cpu.cache_key(codebook) is cpu.cache_key(codebook)  # unchanged: the remembered key itself
    for change in (lambda e: e.data[:150], lambda e: base.as_strided((300, 16), (32, 1))):  # shape; strides
        codebook = base[:300]  # a view: the .data assignment below leaves base as it is
        key = cpu.cache_key(codebook)
        assert_exact(x, codebook)
        pointer = codebook.data_ptr()
        codebook.data = change(codebook)
        assert codebook.data_ptr() == pointer
        assert cpu.cache_key(codebook) != key
        assert_exact(x, codebook)
    codebook = base[:300]
    key = cpu.cache_key(codebook)
    codebook.data = base[300:]  # another pointer, the same shape, strides, dtype (and version)
    assert cpu.cache_key(codebook) != key
    assert_exact(x, codebook)
    # dtype: a bfloat16 codebook seen as float16 (same bits, pointer, shape and strides; every value
    # stays a small multiple of 1/8, so the answers are still exact)
    codebook = base[:300].to(torch.bfloat16)
    key = cpu.cache_key(codebook)
    assert_exact(x, codebook)
    codebook.data = codebook.data.view(torch.float16)
    assert cpu.cache_key(codebook) != key
    assert_exact(x, codebook)
    alive = weakref.ref(codebook)
    del codebook
    gc.collect()
    assert alive() is None


def test_a_pack_on_huge_pages_is_counted_at_its_allocated_size():
    """A pack of 2 MiB or more is allocated in whole 2 MiB pages (csrc/cpu/large_buffer.h): the cache's bound
    counts those, not the bytes asked for."""
    fastvq.empty_cache()
    x, codebook = exact_pair(3, 8200, 64, seed=8)  # panels and norms: about 2.04 MiB
    assert_exact(x, codebook)
    held = cpu._cpu.pack_cache_bytes()
    assert held % (2 << 20) == 0 and held >= 8200 * 65 * 4, held
    fastvq.empty_cache()


def test_the_cache_is_bounded_and_empty_cache_releases_it():
    x, _ = exact_pair(20, 8, 32, seed=5)
    codebooks = [small_integers(4096, 32, generator=torch.Generator().manual_seed(s)) for s in range(7)]
    for codebook in codebooks:
        assert_exact(x, codebook)
    one_pack = 4096 * 33 * 4  # panels and norms of K = 4096, d = 32 (plus the centre, rounded up)
    assert cpu._cpu.pack_cache_bytes() <= 4 * (one_pack + 4096)  # at most 4 packs kept
    assert len(cpu._pins) <= cpu.PIN_LIMIT
    fastvq.empty_cache()
    assert cpu._cpu.pack_cache_bytes() == 0 and len(cpu._pins) == 0
    assert_exact(x, codebooks[0])  # and searches still work


def test_concurrent_threads_each_get_their_own_answers():
    shared_x, shared = exact_pair(200, 2000, 16, seed=6)
    expected_shared = reference.nearest_code(shared_x.double(), shared.double())[0]
    failures = []

    def work(seed):
        try:
            x, codebook = exact_pair(100, 1500, 16, seed=100 + seed)
            for step in range(6):
                indices, _ = fastvq.nearest_code(x, codebook, backend="cpu")
                if not torch.equal(indices, reference.nearest_code(x.double(), codebook.double())[0]):
                    failures.append(f"thread {seed}, step {step}: own codebook")
                top, _ = fastvq.nearest_codes(shared_x, shared, 3, backend="cpu")
                if not torch.equal(top[:, 0], expected_shared):
                    failures.append(f"thread {seed}, step {step}: shared codebook")
                codebook[step::5].add_(1.0)  # change this thread's codebook in place between searches
        except Exception as error:  # reported below; a thread's exception would otherwise vanish
            failures.append(f"thread {seed}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
