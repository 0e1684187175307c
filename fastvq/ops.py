"""Every fastvq torch.library custom op: schema, fake implementation and autograd, in one place.

Op map: each op by name through every layer (the kernels keep the op's name in each backend).

| op                | cpu (C++)                      | triton                            | cuda (C++)                    | oracle (torch backend)          | test                        | benchmark                   |
|-------------------|--------------------------------|-----------------------------------|-------------------------------|---------------------------------|-----------------------------|-----------------------------|
| nearest_code      | csrc/cpu/nearest_code.cpp      | fastvq/triton/nearest_code.py     | csrc/cuda/nearest_code.cu     | reference.nearest_code          | tests/test_nearest_code.py  | fastvq.bench nearest_code   |
| nearest_codes     | csrc/cpu/nearest_codes.cpp     | fastvq/triton/nearest_codes.py    | (reference, stated fallback)  | reference.nearest_codes         | tests/test_nearest_codes.py | fastvq.bench nearest_codes  |
| sample_code       | csrc/cpu/sample_code.cpp       | fastvq/triton/sample_code.py      | (reference, stated fallback)  | reference.sample_code           | tests/test_sample_code.py   |                             |
| quantize          | nearest_code, + loss here      | nearest_code, + loss here         | nearest_code, + loss here     | reference.quantize              | tests/test_quantize.py      | fastvq.bench train          |
| quantize_backward | csrc/cpu/quantize_backward.cpp | fastvq/triton/quantize_backward.py| csrc/cuda/quantize_backward.cu| reference.quantize_backward     | tests/test_quantize.py      | fastvq.bench train          |
| residual_level_backward_ | csrc/cpu/residual_level_backward.cpp | (quantize_backward + torch) | (quantize_backward + torch) | (quantize_backward + torch) | tests/test_residual_fused.py | fastvq.bench rvq_train |
| ema_stats         | csrc/cpu/ema_stats.cpp         | fastvq/triton/ema_stats.py        | csrc/cuda/ema_stats.cu        | reference.ema_stats             | tests/test_ema_stats.py     | fastvq.bench train, kmeans  |
| snapshot          | (torch clone)                  |                                   |                               |                                 | tests/test_compile.py       |                             |
| kmeans_init_      | fastvq/nn/codebook_init.py on nearest_code + ema_stats                                                         | | tests/test_module_features.py | |
| expire_codes_     | fastvq/nn/dead_codes.py (torch)                                                                                | | tests/test_module_training_options.py | |

The path of one call, e.g. ``FastVectorQuantizer.forward`` → ``ops.quantize`` (here) →
``dispatch.resolve`` → ``backends/cpu.py: CpuBackend.nearest_code`` → ``fastvq._cpu.nearest_code``
(csrc/cpu/bindings.cpp) → ``csrc/cpu/nearest_code.cpp`` → the micro-kernel in ``search_tile_*.cpp``.

    fastvq::nearest_code(x, codebook, backend, hint=None) -> (indices, sqdist)
    fastvq::nearest_codes(x, codebook, k, backend) -> (indices (N, k), sqdist (N, k))
    fastvq::sample_code(x, codebook, temperature, seed, cosine, backend) -> indices (N,) (a Gumbel-max draw)
    fastvq::quantize(x, codebook, commitment_weight, codebook_weight, backend, rotation_trick=False)
        -> (quantized, indices, loss)
    fastvq::quantize_backward(grad_quantized, x, codebook, indices, commit_scale, codebook_scale,
                              backend, need_grad_codebook, rotation_trick=False) -> (grad_x, grad_codebook)
    fastvq::residual_level_backward_(grad_x, residual, grad_quantized, codebook, indices, commit_scale, backend,
                                     rotation_trick, accumulate, advance) -> ()   (mutates grad_x, residual)
    fastvq::ema_stats(x, indices, num_codes, backend) -> (counts, sums)
    fastvq::snapshot(tensor) -> copy
    fastvq::kmeans_init_(embed, cluster_size, embed_avg, initted, x, iters, spherical, eps, sync, backend)
    fastvq::expire_codes_(embed, cluster_size, embed_avg, rows, threshold, reset_cluster_size, spherical, sync)

x is (N, d) here; fastvq.functional reshapes (..., d) and checks arguments. The
backend string ("auto" or a name) is resolved when the op runs, so tracing with
torch.compile never looks at tensor values. N = 0 never reaches a backend.
Inside the package, call these op objects (``ops.quantize(...)``), never ``torch.ops.fastvq.*``.

The search ops' bodies are plain functions too (``nearest_code_eager``, ``nearest_codes_eager``, and
``quantize_search``, quantize less its loss): fastvq.functional calls them directly when
``op_call_is_unobserved`` says nothing could tell the difference. The custom op's own dispatch
(autograd wrapper, redispatch, output checks) costs ~0.1–0.2 ms a call with the caches cold, as much as
the search itself for one frame against 65536 codes.
The Triton kernels register their own ops (``fastvq::triton_*``, fastvq/triton), called by the triton backend.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .dispatch import check_backend_name, resolve
from .numerics import compute_dtype


def op_call_is_unobserved(*tensors: Tensor) -> bool:
    """Whether calling a search op's body (above) instead of the op is invisible: plain eager mode (not
    compiling or jit-tracing, no functorch transform, torch-function or dispatch mode, or profiler), plain
    tensors on a real device, and no autograd graph to record (None stands for an absent optional tensor).
    Anything that watches ops gets the op."""
    # torch._C._is_tracing: torch.jit.is_tracing less its is_scripting test (this never runs scripted). This
    # test runs on every streaming call: is_meta rather than device.type, and the loop below, save ~20 µs of
    # it with the caches cold.
    if (torch.compiler.is_compiling() or torch._C._is_tracing() or torch._C._len_torch_dispatch_stack()
            or torch._C._len_torch_function_stack() or torch.autograd._profiler_enabled()
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:  # a loop, not all() over a generator: one frame fewer
        if t is not None and (type(t) is not Tensor or t.is_meta or (grad and t.requires_grad)):
            return False
    return True


# ---- nearest_code ---------------------------------------------------------------------------
def nearest_code_eager(x: Tensor, codebook: Tensor, backend: str,
                       hint: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``hint``: int64 (N,), a guess of each row's code (k-means passes the last assignment); the cpu
    backend's int8 prefilter starts its scan from it. The outputs are the same for any hint."""
    if hint is not None:
        _check_hint(hint, x, codebook)
    if x.shape[0] == 0:
        check_backend_name(backend)
        return _empty_indices(x), x.new_empty((0,), dtype=compute_dtype(x.dtype))
    indices, sqdist, _ = resolve(backend, x, codebook).nearest_code(x, codebook, want_quantized=False, hint=hint)
    return indices, sqdist


nearest_code = torch.library.custom_op("fastvq::nearest_code", mutates_args=())(nearest_code_eager)


@nearest_code.register_fake
def _(x, codebook, backend, hint=None):
    return _empty_indices(x), x.new_empty((x.shape[0],), dtype=compute_dtype(x.dtype))


def _check_hint(hint: Tensor, x: Tensor, codebook: Tensor) -> None:
    if hint.dtype != torch.int64 or hint.shape != x.shape[:1] or hint.device != x.device:
        raise ValueError(f"hint must be an int64 tensor of shape ({x.shape[0]},) on {x.device}, got "
                         f"{hint.dtype} of shape {tuple(hint.shape)} on {hint.device}")
    if hint.numel() and not (0 <= int(hint.min()) and int(hint.max()) < codebook.shape[0]):
        raise ValueError(f"hint must hold codes in [0, {codebook.shape[0]}), got values in "
                         f"[{int(hint.min())}, {int(hint.max())}]")


def _empty_indices(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[0],), dtype=torch.int64)


# ---- nearest_codes (top-k) ------------------------------------------------------------------
def nearest_codes_eager(x: Tensor, codebook: Tensor, k: int, backend: str) -> tuple[Tensor, Tensor]:
    """Each row's k nearest codes, nearest first, ties to the lower index; 1 <= k <= min(K, 64)."""
    if x.shape[0] == 0:
        check_backend_name(backend)
        return x.new_empty((0, k), dtype=torch.int64), x.new_empty((0, k), dtype=compute_dtype(x.dtype))
    indices, sqdist = resolve(backend, x, codebook, op="nearest_codes").nearest_codes(x, codebook, k)
    return indices, sqdist


nearest_codes = torch.library.custom_op("fastvq::nearest_codes", mutates_args=())(nearest_codes_eager)


@nearest_codes.register_fake
def _(x, codebook, k, backend):
    return (x.new_empty((x.shape[0], k), dtype=torch.int64),
            x.new_empty((x.shape[0], k), dtype=compute_dtype(x.dtype)))


# ---- sample_code (vqp's stochastic_sample_codes: a Gumbel-max draw, noise hashed in the kernel) ----
@torch.library.custom_op("fastvq::sample_code", mutates_args=())
def sample_code(x: Tensor, codebook: Tensor, temperature: float, seed: int, cosine: bool, backend: str) -> Tensor:
    """indices (N,): argmin over codes of vqp's −logit (sqrt(max(‖x − e‖², 1e-8)), or −x·e when
    ``cosine``) minus temperature·Gumbel noise, the noise hashed from (seed, row, code) as
    fastvq/reference.py specifies, so a draw from softmax(logits / temperature). temperature > 0."""
    if not (0.0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if x.shape[0] == 0:
        check_backend_name(backend)
        return _empty_indices(x)
    return resolve(backend, x, codebook, op="sample_code").sample_code(x, codebook, temperature, seed, cosine)


@sample_code.register_fake
def _(x, codebook, temperature, seed, cosine, backend):
    return _empty_indices(x)


# ---- quantize (search + gather + loss, with the straight-through or rotation-trick backward) -
# vector-quantize-pytorch's safe division in the rotation trick: norms are clamped to at least this.
ROTATION_EPS = 1e-6


def quantize_search(x: Tensor, codebook: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """quantize's search and gather without its loss: (quantized (contiguous, x's dtype), indices, sqdist).
    fastvq.quantize drops the loss, so it calls this directly when ``op_call_is_unobserved``: the loss's
    three torch ops cost ~0.1 ms with the caches cold, as much as a quarter of a one-frame streaming call."""
    if x.shape[0] == 0:
        check_backend_name(backend)
        return x.new_empty((0, x.shape[1])), _empty_indices(x), x.new_empty((0,), dtype=compute_dtype(x.dtype))
    indices, sqdist, quantized = resolve(backend, x, codebook).nearest_code(x, codebook, want_quantized=True, hint=None)
    return quantized.contiguous(), indices, sqdist


@torch.library.custom_op("fastvq::quantize", mutates_args=())
def quantize(
    x: Tensor, codebook: Tensor, commitment_weight: float, codebook_weight: float, backend: str,
    rotation_trick: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(quantized, indices, loss): quantized = codebook[indices] in x's dtype, loss =
    (commitment_weight + codebook_weight)·mean((x − q)²).

    The backward is straight-through, or with ``rotation_trick`` the rotation trick's
    (grad_x = (‖q‖/‖x‖)·Rᵀg, fused into quantize_backward). The rotation trick's value is q
    up to rounding except where its safe division bites (‖x‖ < ROTATION_EPS; x = 0 gives 0),
    and those rows get vector-quantize-pytorch's value.
    """
    num_rows, dim = x.shape
    if num_rows == 0:
        check_backend_name(backend)
        return x.new_empty((0, dim)), _empty_indices(x), x.new_zeros((), dtype=compute_dtype(x.dtype))
    quantized, indices, sqdist = quantize_search(x, codebook, backend)
    # mean((x − q)²) over all N·d entries is Σ sqdist / (N·d); both loss terms have that value.
    weight = (commitment_weight + codebook_weight) / (num_rows * dim)
    loss = (sqdist.sum(dtype=torch.float64) * weight).to(compute_dtype(x.dtype))
    if rotation_trick:
        quantized = _rotation_value_of_tiny_rows(x, quantized)
    return quantized, indices, loss


def _rotation_value_of_tiny_rows(x: Tensor, quantized: Tensor) -> Tensor:
    """quantized, with the rows where ‖x‖ < ROTATION_EPS replaced by the rotation trick's value
    (x·(‖q‖/ε) rotated, as vector-quantize-pytorch computes it; 0 for x = 0)."""
    x32 = x.to(torch.float32)
    tiny = torch.nonzero(x32.norm(dim=1) < ROTATION_EPS).squeeze(1)
    if tiny.numel() == 0:
        return quantized
    rows, codes = x32[tiny], quantized[tiny].to(torch.float32)
    q_norm = codes.norm(dim=1, keepdim=True)
    x_unit, q_unit = rows / ROTATION_EPS, codes / q_norm.clamp_min(ROTATION_EPS)
    w = torch.nn.functional.normalize(x_unit + q_unit, dim=1, eps=ROTATION_EPS)
    rotated = rows - 2 * (rows * w).sum(1, keepdim=True) * w + 2 * (rows * x_unit).sum(1, keepdim=True) * q_unit
    quantized = quantized.clone()
    quantized[tiny] = (rotated * (q_norm / ROTATION_EPS)).to(quantized.dtype)
    return quantized


@quantize.register_fake
def _(x, codebook, commitment_weight, codebook_weight, backend, rotation_trick=False):
    # Outputs are contiguous whatever x's strides, as every backend returns them.
    return x.new_empty(x.shape), _empty_indices(x), x.new_empty((), dtype=compute_dtype(x.dtype))


def _setup_quantize(ctx, inputs, output):
    x, codebook, commitment_weight, codebook_weight, backend, rotation_trick = inputs
    _, indices, _ = output
    ctx.save_for_backward(x, codebook, indices)
    ctx.commitment_weight = commitment_weight
    ctx.codebook_weight = codebook_weight
    ctx.backend = backend
    ctx.rotation_trick = rotation_trick


def _quantize_backward_rule(ctx, grad_quantized, grad_indices, grad_loss):
    x, codebook, indices = ctx.saved_tensors
    num_rows, dim = x.shape
    # d/dx of w·mean((x − q)²) is w·2(x − q)/(N·d); the codebook term mirrors it.
    scale = 2.0 / max(num_rows * dim, 1)
    grad_loss = grad_loss.to(compute_dtype(x.dtype))
    need_grad_codebook = ctx.needs_input_grad[1] and ctx.codebook_weight != 0.0
    grad_x, grad_codebook = quantize_backward(
        grad_quantized,
        x,
        codebook,
        indices,
        grad_loss * (ctx.commitment_weight * scale),
        grad_loss * (ctx.codebook_weight * scale),
        ctx.backend,
        need_grad_codebook,
        ctx.rotation_trick,
    )
    return grad_x, (grad_codebook if need_grad_codebook else None), None, None, None, None


quantize.register_autograd(_quantize_backward_rule, setup_context=_setup_quantize)


# ---- quantize_backward ----------------------------------------------------------------------
@torch.library.custom_op("fastvq::quantize_backward", mutates_args=())
def quantize_backward(
    grad_quantized: Tensor,
    x: Tensor,
    codebook: Tensor,
    indices: Tensor,
    commit_scale: Tensor,
    codebook_scale: Tensor,
    backend: str,
    need_grad_codebook: bool,
    rotation_trick: bool = False,
) -> tuple[Tensor, Tensor]:
    """grad_codebook is an empty (0,) tensor when not needed (a custom op cannot return None)."""
    if x.shape[0] == 0:
        check_backend_name(backend)
        grad_codebook = torch.zeros_like(codebook) if need_grad_codebook else codebook.new_empty((0,))
        return x.new_empty(x.shape), grad_codebook
    grad_x, grad_codebook = resolve(backend, x, codebook).quantize_backward(
        grad_quantized, x, codebook, indices, commit_scale, codebook_scale,
        need_grad_x=True, need_grad_codebook=need_grad_codebook, rotation_trick=rotation_trick,
    )
    grad_codebook = grad_codebook.contiguous() if need_grad_codebook else codebook.new_empty((0,))
    return grad_x.contiguous(), grad_codebook


@quantize_backward.register_fake
def _(grad_quantized, x, codebook, indices, commit_scale, codebook_scale, backend, need_grad_codebook,
      rotation_trick=False):
    return x.new_empty(x.shape), (codebook.new_empty(codebook.shape) if need_grad_codebook else codebook.new_empty((0,)))


# ---- residual_level_backward_ ---------------------------------------------------------------
@torch.library.custom_op("fastvq::residual_level_backward_", mutates_args=("grad_x", "residual"))
def residual_level_backward_(
    grad_x: Tensor,
    residual: Tensor,
    grad_quantized: Tensor,
    codebook: Tensor,
    indices: Tensor,
    commit_scale: Tensor,
    backend: str,
    rotation_trick: bool,
    accumulate: bool,
    advance: bool,
) -> None:
    """One level of ResidualVQ's greedy backward (fastvq/nn/greedy_levels.py), on float32 (M, d) tensors the
    caller owns: grad_x = quantize_backward's grad_x of (grad_quantized, residual, codebook, indices,
    commit_scale, rotation_trick), added to grad_x when ``accumulate``; then, with ``advance``, residual −= the
    level's quantized value in place (the code, or with the rotation trick its value on tiny rows), bitwise
    as the forward formed the next level's input. The cpu backend does it in one pass; the others compose
    quantize_backward and torch ops."""
    if residual.shape[0] == 0:
        check_backend_name(backend)
        return
    tiny = resolve(backend, residual, codebook).residual_level_backward_(
        grad_x, residual, grad_quantized, codebook, indices, commit_scale, rotation_trick, accumulate, advance)
    if tiny is None:  # no fused kernel: the composite path
        grad_level, _ = quantize_backward(grad_quantized, residual, codebook, indices, commit_scale,
                                          commit_scale * 0.0, backend, False, rotation_trick)
        if accumulate:
            grad_x.add_(grad_level)
        else:
            grad_x.copy_(grad_level)
        if advance:
            gathered = codebook.index_select(0, indices)
            residual.sub_(_rotation_value_of_tiny_rows(residual, gathered) if rotation_trick else gathered)
    elif advance and rotation_trick:  # the rows the kernel left for the rotation trick's value, if any
        rows = torch.nonzero(tiny).squeeze(1)
        if rows.numel():
            level_input = residual[rows]
            residual[rows] = level_input - _rotation_value_of_tiny_rows(level_input, codebook[indices[rows]])


@residual_level_backward_.register_fake
def _(grad_x, residual, grad_quantized, codebook, indices, commit_scale, backend, rotation_trick, accumulate,
      advance):
    return None


# ---- ema_stats ------------------------------------------------------------------------------
@torch.library.custom_op("fastvq::ema_stats", mutates_args=())
def ema_stats(x: Tensor, indices: Tensor, num_codes: int, backend: str) -> tuple[Tensor, Tensor]:
    """Per-code counts (K,) and sums (K, d) in the compute dtype (float64 for float64 x, else
    float32). Indices must lie in [0, num_codes)."""
    if x.shape[0] == 0:
        check_backend_name(backend)
        return (x.new_zeros((num_codes,), dtype=compute_dtype(x.dtype)),
                x.new_zeros((num_codes, x.shape[1]), dtype=compute_dtype(x.dtype)))
    return resolve(backend, x).ema_stats(x, indices, num_codes)


@ema_stats.register_fake
def _(x, indices, num_codes, backend):
    return (x.new_empty((num_codes,), dtype=compute_dtype(x.dtype)),
            x.new_empty((num_codes, x.shape[1]), dtype=compute_dtype(x.dtype)))


# ---- snapshot -------------------------------------------------------------------------------
@torch.library.custom_op("fastvq::snapshot", mutates_args=())
def snapshot(tensor: Tensor) -> Tensor:
    """A copy of a buffer that torch.compile must save, never recompute.

    FastVectorQuantizer's EMA step rewrites ``embed`` in place after the search, and the
    backward needs the rows the search used. A plain ``embed.clone()`` is correct in eager
    mode, but AOTAutograd's partitioners (torch 2.13) may recompute that clone in the
    backward from the buffer, after the in-place update, and so return a silently wrong
    commitment gradient (pytorch/pytorch PR #197039, "Don't recompute reads of mutated
    inputs or mutable buffers"). A custom op is opaque to the partitioner, so its output
    is saved instead of recomputed. No autograd: use it on buffers.
    """
    return tensor.clone(memory_format=torch.contiguous_format)


@snapshot.register_fake
def _(tensor):
    return tensor.new_empty(tensor.shape)


# ---- kmeans_init_ and expire_codes_ (the module layer's data-dependent codebook steps) -------
# Each is one opaque op, so torch.compile(fullgraph=True) never traces their data-dependent
# loops and shapes. The work is the module layer's (fastvq/nn), imported at the call: the op
# layer does not import the module layer when it loads.
@torch.library.custom_op("fastvq::kmeans_init_", mutates_args=("embed", "cluster_size", "embed_avg", "initted"))
def kmeans_init_(
    embed: Tensor,
    cluster_size: Tensor,
    embed_avg: Tensor,
    initted: Tensor,
    x: Tensor,
    iters: int,
    spherical: bool,
    eps: float,
    sync: bool,
    backend: str,
) -> None:
    """Set each codebook (C, K, d) from k-means on x (C, M, d), unless ``initted`` is True
    (fastvq/nn/codebook_init.py)."""
    from .nn.codebook_init import kmeans_init_codebook_

    kmeans_init_codebook_(embed, cluster_size, embed_avg, initted, x, iters, spherical, eps, sync, backend)


@kmeans_init_.register_fake
def _(embed, cluster_size, embed_avg, initted, x, iters, spherical, eps, sync, backend):
    return None


@torch.library.custom_op("fastvq::expire_codes_", mutates_args=("embed", "cluster_size", "embed_avg"))
def expire_codes_(
    embed: Tensor,
    cluster_size: Tensor,
    embed_avg: Tensor,
    rows: Tensor,
    threshold: float,
    reset_cluster_size: float,
    spherical: bool,
    sync: bool,
) -> None:
    """Replace the codes whose cluster_size < threshold by rows of x (C, M, d)
    (fastvq/nn/dead_codes.py)."""
    from .nn.dead_codes import expire_codes

    expire_codes(embed, cluster_size, embed_avg, rows, threshold, reset_cluster_size, spherical, sync)


@expire_codes_.register_fake
def _(embed, cluster_size, embed_avg, rows, threshold, reset_cluster_size, spherical, sync):
    return None
