"""Reliability beyond the input matrix: determinism, resume from a state_dict, the bad-input table,
k-means init on non-finite rows, the EMA state at large K, module casts, fork and float64.

What each function and module does with NaN/Inf, huge, tiny and offset values, ties, N = 0, K = 1,
d = 1, d = 0 and odd layouts is test_reliability_matrix.py. Resume runs on every (backend, device)
pair (conftest.py); the thread-count determinism tests are about the cpu kernels only.
"""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import fastvq
from fastvq import BackendNotSupportedError, FastVectorQuantizer, dispatch

from conftest import TOLERANCES, backend_or_skip, skip_on_interpreter, use_reduction


def with_threads(threads: int, fn):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


def assert_bitwise_equal(first: list[torch.Tensor], second: list[torch.Tensor], what: str) -> None:
    assert len(first) == len(second)
    for position, (a, b) in enumerate(zip(first, second)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}[{position}]"
        assert torch.equal(a, b), f"{what}[{position}] differs: max |diff| {float((a.double() - b.double()).abs().max())}"


# ---- determinism ------------------------------------------------------------------------------
def training_trace(backend: str, ema_update: bool) -> list[torch.Tensor]:
    """Everything a short training run produces: indices, losses, gradients, final state."""
    torch.manual_seed(0)
    module = FastVectorQuantizer(33, 257, decay=0.9, ema_update=ema_update, learnable_codebook=not ema_update,
                                 backend=backend).train()
    embed = module._codebook.embed
    generator = torch.Generator().manual_seed(1)
    trace = []
    for _ in range(3):
        x = (2 * torch.randn(4099, 33, generator=generator)).requires_grad_()
        quantized, indices, loss = module(x)
        (quantized.square().sum() + 10.0 * loss).backward()
        trace += [indices, loss.detach(), quantized.detach(), x.grad]
        if not ema_update:
            trace.append(embed.grad.clone())
            with torch.no_grad():
                embed -= 0.5 * embed.grad
            embed.grad = None
    return trace + [value.clone() for value in module.state_dict().values()]


@pytest.mark.parametrize("ema_update", [True, False], ids=["ema", "learnable"])
def test_cpu_training_is_bitwise_deterministic_across_runs_and_thread_counts(ema_update):
    backend_or_skip("cpu", torch.empty(1, 1))
    first = with_threads(2, lambda: training_trace("cpu", ema_update))
    assert_bitwise_equal(first, with_threads(2, lambda: training_trace("cpu", ema_update)), "run to run")
    for threads in (1, 3):
        assert_bitwise_equal(first, with_threads(threads, lambda: training_trace("cpu", ema_update)),
                             f"{threads} threads vs 2")


def test_cpu_kernels_are_bitwise_identical_for_any_thread_count():
    backend_or_skip("cpu", torch.empty(1, 1))
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(5000, 64, generator=generator)
    codebook = torch.randn(1030, 64, generator=generator)
    few_codes = torch.randint(0, 3, (5000,), generator=generator)  # long per-code sums: order matters

    def kernels():
        indices, sqdist = fastvq.nearest_code(x, codebook, backend="cpu")
        counts, sums = fastvq.ema_stats(x, few_codes, 3, backend="cpu")
        return [indices, sqdist, counts, sums]

    first = with_threads(1, kernels)
    for threads in (2, 3):
        assert_bitwise_equal(first, with_threads(threads, kernels), f"{threads} threads vs 1")


# ---- resume -----------------------------------------------------------------------------------
class TinyVQAutoencoder(nn.Module):
    def __init__(self, pair, ema_update: bool, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Linear(12, 2 * 6)
        self.quantizer = FastVectorQuantizer(6, 17, decay=0.8, ema_update=ema_update, learnable_codebook=not ema_update,
                                             backend=pair.backend)
        self.decoder = nn.Linear(2 * 6, 12)
        self.to(pair.device)

    def forward(self, x):
        quantized, indices, loss = self.quantizer(self.encoder(x).view(-1, 2, 6))
        return self.decoder(quantized.reshape(-1, 12)), indices, loss


def train_steps(model, optimizer, batches) -> list[torch.Tensor]:
    trace = []
    for x in batches:
        reconstruction, indices, vq_loss = model(x)
        loss = (reconstruction - x).square().mean() + vq_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        trace += [indices, loss.detach()]
    return trace


@pytest.mark.parametrize("ema_update", [True, False], ids=["ema", "learnable"])
def test_resume_from_state_dict_equals_uninterrupted_training(pair, monkeypatch, ema_update):
    skip_on_interpreter(pair, "24 training steps")
    use_reduction(monkeypatch, "deterministic")  # GPU float atomics would differ run to run
    generator = torch.Generator().manual_seed(3)
    batches = list(pair.to(torch.randn(8, 64, 12, generator=generator)))

    model = TinyVQAutoencoder(pair, ema_update, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    uninterrupted = train_steps(model, optimizer, batches)

    model = TinyVQAutoencoder(pair, ema_update, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first_half = train_steps(model, optimizer, batches[:4])
    checkpoint = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint)
    del model, optimizer

    checkpoint.seek(0)
    saved = torch.load(checkpoint, weights_only=True)
    resumed = TinyVQAutoencoder(pair, ema_update, seed=1)  # different initial weights
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    second_half = train_steps(resumed, resumed_optimizer, batches[4:])

    assert_bitwise_equal(uninterrupted, first_half + second_half, "indices and losses")
    reference_model = TinyVQAutoencoder(pair, ema_update, seed=0)
    train_steps(reference_model, torch.optim.Adam(reference_model.parameters(), lr=1e-2), batches)
    final, expected = resumed.state_dict(), reference_model.state_dict()
    assert final.keys() == expected.keys()
    if ema_update:
        assert {"quantizer._codebook.embed", "quantizer._codebook.cluster_size",
                "quantizer._codebook.embed_avg"} <= final.keys()
    assert_bitwise_equal(list(final.values()), list(expected.values()), "final state")


# ---- the bad-input table ----------------------------------------------------------------------
# (case, call, exception, message pattern). The README's bad-input table is this list.
def _x(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(shape, dtype=dtype, device=device)


def _vq(**kwargs):
    return FastVectorQuantizer(4, 3, **kwargs)


_IDX = torch.zeros(5, dtype=torch.int64)
BAD_INPUTS = [
    ("x wrong rank (nearest_code)", lambda: fastvq.nearest_code(_x(1, 5, 4), _x(3, 4)), ValueError,
     r"x must have shape \(N, d\) with d == codebook.shape\[1\] == 4, got \(1, 5, 4\)"),
    ("x wrong rank (quantize, 0-dim)", lambda: fastvq.quantize(_x(), _x(3, 4)), ValueError,
     r"x must have shape \(\.\.\., d\)"),
    ("codebook wrong rank", lambda: fastvq.nearest_code(_x(5, 4), _x(4)), ValueError,
     r"codebook must have shape \(K, d\), got \(4,\)"),
    ("d mismatch", lambda: fastvq.quantize(_x(5, 4), _x(3, 5)), ValueError,
     r"x must have shape \(\.\.\., d\) with d == codebook.shape\[1\] == 5, got \(5, 4\)"),
    ("K = 0", lambda: fastvq.nearest_code(_x(5, 4), _x(0, 4)), ValueError, r"codebook must have at least one row"),
    ("integer x", lambda: fastvq.nearest_code(_x(5, 4, dtype=torch.int64), _x(3, 4)), TypeError,
     r"x must be a floating-point tensor .* got dtype torch.int64"),
    ("integer codebook", lambda: fastvq.quantize(_x(5, 4), _x(3, 4, dtype=torch.int32)), TypeError,
     r"codebook must be a floating-point tensor .* got dtype torch.int32"),
    ("x not a tensor", lambda: fastvq.nearest_code([[0.0] * 4], _x(3, 4)), TypeError,
     r"x must be a torch.Tensor, got list"),
    ("x and codebook on different devices", lambda: fastvq.nearest_code(_x(5, 4, device="meta"), _x(3, 4)),
     ValueError, r"x and codebook must be on the same device, got x on meta and codebook on cpu"),
    ("x and indices on different devices (ema_stats)",
     lambda: fastvq.ema_stats(_x(5, 4, device="meta"), _IDX, 3), ValueError, r"same device"),
    ("module: codebook_size <= 0", lambda: FastVectorQuantizer(4, 0), ValueError,
     r"codebook_size must be an int >= 1, got 0"),
    ("module: dim <= 0", lambda: FastVectorQuantizer(-2, 3), ValueError, r"dim must be an int >= 1, got -2"),
    ("module: dim not an int", lambda: FastVectorQuantizer(2.5, 3), TypeError, r"dim must be an int, got 2\.5"),
    ("module: decay outside [0, 1]", lambda: _vq(decay=1.5), ValueError,
     r"decay must be a finite number in \[0\.0, 1\.0\], got 1\.5"),
    ("module: input last dim != dim", lambda: _vq()(_x(2, 5)), ValueError,
     r"x must have shape \(B, N, dim\), \(B, \.\.\., dim\) or \(B, dim\) with dim == 4, got \(2, 5\)"),
    ("module: input on another device than the codebook", lambda: _vq()(_x(2, 4, device="meta")), ValueError,
     r"x must be on the codebook's device cpu, got meta"),
    ("module: mask of the wrong shape and dtype", lambda: _vq()(_x(2, 5, 4), mask=torch.ones(2, 5, 4)), ValueError,
     r"mask must be a bool tensor of shape \(2, 5\), got a tensor of shape \(2, 5, 4\), dtype torch\.float32, on cpu"),
    ("module: a vqp feature fastvq does not implement", lambda: _vq(affine_param=True), ValueError,
     r"FastVectorQuantizer does not implement vector-quantize-pytorch's affine_param=True; only the "
     r"default affine_param=False is accepted"),
    ("sparse x", lambda: fastvq.nearest_code(_x(5, 4).to_sparse(), _x(3, 4)), TypeError,
     r"x must be a dense \(strided\) tensor, got layout torch\.sparse_coo"),
    ("d = 0, float32", lambda: fastvq.nearest_code(_x(5, 0), _x(3, 0)), ValueError,
     r"codebook must have at least one column \(d >= 1\), got shape \(3, 0\)"),
    ("d = 0, float64 (the same error in every dtype)", lambda: fastvq.quantize(_x(5, 0).double(), _x(3, 0).double()),
     ValueError, r"codebook must have at least one column \(d >= 1\), got shape \(3, 0\)"),
    ("ema_stats: num_codes a float", lambda: fastvq.ema_stats(_x(5, 4), _IDX, 3.0), TypeError,
     r"num_codes must be an int, got float"),
    ("ema_stats: num_codes a bool", lambda: fastvq.ema_stats(_x(5, 4), torch.zeros(5, dtype=torch.int64), True),
     TypeError, r"num_codes must be an int, got bool"),
    ("module: eps = inf", lambda: _vq(eps=float("inf")), ValueError, r"eps must be a finite number >= 0\.0, got inf"),
    ("ema_stats: index >= num_codes", lambda: fastvq.ema_stats(_x(5, 4), torch.tensor([0, 1, 2, 3, 0]), 3),
     ValueError, r"indices must lie in \[0, num_codes\) = \[0, 3\), got values in \[0, 3\]"),
    ("ema_stats: negative index", lambda: fastvq.ema_stats(_x(5, 4), torch.tensor([0, -1, 2, 1, 0]), 3),
     ValueError, r"indices must lie in \[0, num_codes\)"),
    ("ema_stats: indices not int64", lambda: fastvq.ema_stats(_x(5, 4), _IDX.int(), 3), TypeError,
     r"indices must have dtype torch.int64, got torch.int32"),
    ("ema_stats: indices shape != (N,)", lambda: fastvq.ema_stats(_x(5, 4), _IDX[:4], 3), ValueError,
     r"indices must have shape \(5,\) to match x, got \(4,\)"),
    ("ema_stats: num_codes <= 0", lambda: fastvq.ema_stats(_x(5, 4), _IDX, 0), ValueError,
     r"num_codes must be a positive int, got 0"),
    ("get_codes_from_indices: index out of range", lambda: _vq().get_codes_from_indices(torch.tensor([3])),
     ValueError, r"indices must lie in \[-codebook_size, codebook_size\) = \[-3, 3\) .*got values in \[3, 3\]"),
    ("get_codes_from_indices: float indices", lambda: _vq().get_codes_from_indices(torch.tensor([1.0])),
     TypeError, r"indices must be an int64 or int32 tensor, got a tensor of shape \(1,\), dtype torch\.float32"),
    ("unknown backend name", lambda: fastvq.nearest_code(_x(5, 4), _x(3, 4), backend="nope"), ValueError,
     r"backend must be 'auto' or one of 'cpu', 'triton', 'cuda', 'torch', got 'nope'"),
    ("unknown backend name, empty x", lambda: fastvq.nearest_code(_x(0, 4), _x(3, 4), backend="nope"),
     ValueError, r"backend must be 'auto' or one of"),
    ("unknown backend name (module, raised at the first forward)", lambda: _vq(backend="nope")(_x(2, 4)),
     ValueError, r"backend must be 'auto' or one of"),
    ("backend not a str", lambda: fastvq.nearest_code(_x(5, 4), _x(3, 4), backend=3), TypeError,
     r"backend must be a str, got int"),
    ("forced backend that cannot run (cuda on CPU tensors)",
     lambda: fastvq.nearest_code(_x(5, 4), _x(3, 4), backend="cuda"), BackendNotSupportedError,
     r"backend 'cuda' cannot run on these inputs: .+"),
]


@pytest.mark.parametrize("call,error,pattern", [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_a_named_error(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_backend_not_supported_is_a_value_error():
    assert issubclass(BackendNotSupportedError, ValueError)


def test_unknown_backend_from_the_environment(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "nope")
    with pytest.raises(ValueError, match=r"got 'nope'"):
        fastvq.nearest_code(_x(5, 4), _x(3, 4))


def test_forced_cpu_backend_that_cannot_run_says_why():
    if "cpu" not in fastvq.available_backends():
        pytest.skip(f"backend 'cpu' unavailable: {fastvq.unavailable_reasons().get('cpu')}")
    with pytest.raises(BackendNotSupportedError, match=r"backend 'cpu' cannot run on these inputs: .*float64"):
        fastvq.nearest_code(_x(5, 4, dtype=torch.float64), _x(3, 4, dtype=torch.float64), backend="cpu")


# ---- k-means with non-finite rows (issue 12, finding 2; the matrix has fastvq.kmeans's cells) ---
def test_kmeans_with_no_finite_row_says_so():
    with pytest.raises(ValueError, match="at least one finite row"):
        fastvq.kmeans(torch.full((4, 3), float("nan")), 2)


@pytest.mark.parametrize("heads", [1, 2])
def test_kmeans_init_leaves_non_finite_rows_out(heads):
    kwargs = dict(kmeans_init=True, heads=heads, codebook_dim=4, separate_codebook_per_head=heads > 1)
    x = torch.randn(3, 40, 4, generator=torch.Generator().manual_seed(4))
    dirty = torch.cat([x[:, :10], torch.full((3, 2, 4), float("nan")), x[:, 10:]], dim=1)
    dirty[1, 11, 0] = float("inf")
    results = []
    for batch in (x, dirty):
        torch.manual_seed(0)
        module = FastVectorQuantizer(4, 16, **kwargs).eval()  # eval: k-means init runs, the EMA does not
        torch.manual_seed(1)
        module(batch)
        results.append(module._codebook.state_dict())
    for name, value in results[0].items():
        assert torch.equal(results[1][name], value), name
    assert bool(torch.isfinite(results[1]["embed"]).all())


# ---- EMA state across thread counts at large K (issue 12, finding 3) -----------------------------
_EMA_STATE_DIGEST = """
import hashlib, sys, torch
from fastvq import FastVectorQuantizer
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
module = FastVectorQuantizer(8, int(sys.argv[2]), eps=1.0, rotation_trick=False, backend="cpu").train()
# Counts that are not round numbers, as after long training, whose total's rounding depends on the
# summation order; with eps = 1 that rounding reaches the smoothed counts instead of cancelling.
module._codebook.cluster_size.copy_(torch.rand(module._codebook.cluster_size.shape))
for step in range(3):
    module(torch.randn(4, 512, 8, generator=torch.Generator().manual_seed(step)))
digest = hashlib.sha256()
for value in module.state_dict().values():
    digest.update(value.contiguous().numpy().tobytes())
print(digest.hexdigest())
"""


@pytest.mark.parametrize("num_codes", [40000, 65536])
def test_ema_state_is_bitwise_identical_for_1_2_and_3_threads_at_large_k(num_codes):
    """Every reduction on the EMA path is order-fixed: torch's sum splits more than 32768 elements
    across threads, so the Laplace smoothing's total is a cumulative sum. Separate processes, as
    thread pools keep their size for the life of a process."""
    import subprocess
    import sys

    backend_or_skip("cpu", torch.empty(1, 1))
    digests = {threads: subprocess.run([sys.executable, "-c", _EMA_STATE_DIGEST, str(threads), str(num_codes)],
                                       capture_output=True, text=True, check=True).stdout.strip()
               for threads in (1, 2, 3)}
    assert len(set(digests.values())) == 1, digests


# ---- the codebook state's dtype (issue 12, finding 4) ----------------------------------------------
@pytest.mark.parametrize("cast", ["half", "bfloat16", "double"])
def test_module_casts_leave_the_codebook_state_float32_and_training_finite(cast):
    """fp16 counts and sums overflow (65504) and bf16 ones drift, so the state stays float32 whatever
    the module is cast to; inputs of the cast dtype still train."""
    module = getattr(FastVectorQuantizer(8, 16, decay=0.5, rotation_trick=False, backend="torch"), cast)().train()
    state = module._codebook
    assert [state.embed.dtype, state.embed_avg.dtype, state.cluster_size.dtype] == [torch.float32] * 3
    dtype = {"half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}[cast]
    x = torch.randn(1, 131072, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    quantized, _, loss = module(x)
    assert quantized.dtype == dtype and bool(torch.isfinite(loss))
    assert float(state.cluster_size.sum()) == pytest.approx(0.5 * 16 + 0.5 * 131072, rel=1e-6)
    assert bool(torch.isfinite(state.embed).all() and torch.isfinite(state.embed_avg).all())


# ---- fork: DataLoader workers (issue 12, finding 10) ---------------------------------------------
_DATALOADER_WORKERS = """
import torch
from torch.utils.data import DataLoader, Dataset
import fastvq

codebook = torch.randn(257, 16, generator=torch.Generator().manual_seed(0))
rows = torch.randn(64, 33, 16, generator=torch.Generator().manual_seed(1))
torch.set_num_threads(2)
expected = [fastvq.nearest_code(batch, codebook, backend="cpu")[0] for batch in rows]  # OpenMP up before fork


class Rows(Dataset):
    def __len__(self):
        return len(rows)

    def __getitem__(self, i):  # runs in a forked worker, where torch sets one thread
        return fastvq.nearest_code(rows[i], codebook, backend="cpu")[0]


got = list(DataLoader(Rows(), batch_size=None, num_workers=2, multiprocessing_context="fork"))
assert all(torch.equal(a, b) for a, b in zip(got, expected)) and len(got) == len(expected)
print("ok")
"""


def test_forked_dataloader_workers_search_after_the_parent_started_openmp():
    """GNU OpenMP hangs a multi-threaded call in a forked child; DataLoader workers run with one torch
    thread, which fastvq's kernels follow, so they are safe. A subprocess with a time limit turns a
    hang into a failure."""
    import subprocess
    import sys

    backend_or_skip("cpu", torch.empty(1, 1))
    result = subprocess.run([sys.executable, "-c", _DATALOADER_WORKERS], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# ---- float64 end to end (issue 12, finding 8) ----------------------------------------------------
def test_float64_is_float64_end_to_end_and_its_loss_passes_gradcheck():
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(7, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    codebook = torch.randn(4, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    indices, sqdist = fastvq.nearest_code(x.detach(), codebook.detach())
    counts, sums = fastvq.ema_stats(x.detach(), indices, 4)
    assert sqdist.dtype == counts.dtype == sums.dtype == torch.float64
    exact = ((x.detach() - codebook.detach()[indices]) ** 2).sum(1)
    torch.testing.assert_close(sqdist, exact, **TOLERANCES["float64_roundings"])
    # The loss of the fused op at gradcheck's default eps (1e-6), where a float32 sqdist inside it fails.
    # Each term's gradient reaches one side (stop-gradient on the other), so check one side at a time.
    fixed_codebook, fixed_x = codebook.detach(), x.detach()
    assert torch.autograd.gradcheck(lambda a: fastvq.ops.quantize(a, fixed_codebook, 0.25, 0.0, "auto")[2], (x,))
    assert torch.autograd.gradcheck(lambda b: fastvq.ops.quantize(fixed_x, b, 0.0, 1.0, "auto")[2], (codebook,))


@pytest.mark.parametrize("op", ["nearest_code", "nearest_codes"])
def test_torch_backend_float32_search_beyond_the_range_raises_like_the_cpu_kernels(op):
    # Small integers × 2^62: every float32 distance overflows, so the torch backend would tie all codes
    # at +inf and return index 0; it raises the cpu kernels' error instead. 
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-4, 5, (9, 5), generator=gen).float() * 2.0**62
    codebook = torch.randint(-4, 5, (7, 5), generator=gen).float() * 2.0**62
    call = (lambda b: fastvq.nearest_code(x, codebook, backend=b)) if op == "nearest_code" else \
        (lambda b: fastvq.nearest_codes(x, codebook, 2, backend=b))
    messages = []
    for backend in ("cpu", "torch"):
        with pytest.raises(ValueError, match=r"^codebook row \d+ is too far from the search centre") as info:
            call(backend)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
