"""The oracle: every fastvq op in plain, obviously-correct PyTorch.

Every backend is tested against these functions. They are also the ``torch``
backend, so they must work on any device, but clarity beats speed here:
distances are sums of squared differences, never the ``‖x‖² − 2x·e + ‖e‖²``
expansion the kernels use. Arithmetic is float64 for float64 inputs and float32
for everything else.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .numerics import compute_dtype

# Rows per chunk are chosen so one (rows, K, d) difference tensor stays near this size: 1<<20
# elements (8 MiB in float64) stay in cache, about 5x faster than 1<<24 at 1000x1030x33.
_CHUNK_ELEMENTS = 1 << 20


def pairwise_sqdist(x: Tensor, codebook: Tensor) -> Tensor:
    """(N, K) squared distances. Builds the N×K matrix: oracle use only."""
    dtype = compute_dtype(x.dtype)
    return ((x.to(dtype)[:, None, :] - codebook.to(dtype)[None, :, :]) ** 2).sum(-1)


def nearest_code(x: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """indices (N,) int64 = argmin_k ‖x_i − e_k‖², ties to the lowest k; sqdist (N,) in the
    compute dtype (float64 for float64 x, else float32).

    Non-finite values: a distance that is NaN or ±inf counts as +inf. So a codebook
    row with a NaN/Inf entry is never chosen while a finite row exists, and a row of
    x with a NaN/Inf entry (every distance non-finite) gets index 0. sqdist is always
    ‖x_i − codebook[indices_i]‖² itself, so such a row's sqdist is NaN or inf.
    """
    num_rows, num_codes, dim = x.shape[0], codebook.shape[0], codebook.shape[1]
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, num_codes * dim))
    indices = torch.empty(num_rows, dtype=torch.int64, device=x.device)
    for start in range(0, num_rows, rows_per_chunk):
        chunk = pairwise_sqdist(x[start : start + rows_per_chunk], codebook)
        chunk = torch.where(torch.isfinite(chunk), chunk, torch.inf)
        indices[start : start + rows_per_chunk] = chunk.min(dim=1).indices  # first minimal index
    dtype = compute_dtype(x.dtype)
    sqdist = ((x.to(dtype) - codebook.to(dtype)[indices]) ** 2).sum(-1)
    return indices, sqdist


def nearest_codes(x: Tensor, codebook: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """indices (N, k) int64: each row's k nearest codes, ordered by (float64 distance, index), so ties
    go to the lower index; sqdist (N, k) = ‖x_i − codebook[indices_ij]‖² in the compute dtype.

    Non-finite distances count as +inf, as in nearest_code (a row of x with a NaN gets 0, 1, ..., k−1).
    """
    num_rows, num_codes, dim = x.shape[0], codebook.shape[0], codebook.shape[1]
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, num_codes * dim))
    indices = torch.empty(num_rows, k, dtype=torch.int64, device=x.device)
    for start in range(0, num_rows, rows_per_chunk):
        chunk = pairwise_sqdist(x[start : start + rows_per_chunk].double(), codebook.double())
        chunk = torch.where(torch.isfinite(chunk), chunk, torch.inf)
        order = torch.sort(chunk, dim=1, stable=True).indices  # equal distances keep index order
        indices[start : start + rows_per_chunk] = order[:, :k]
    dtype = compute_dtype(x.dtype)
    sqdist = ((x.to(dtype)[:, None, :] - codebook.to(dtype)[indices]) ** 2).sum(-1)
    return indices, sqdist


# ---- the judge: is a chosen code a nearest code? -----------------------------------------------
# Every test, the benchmark and the device check judge indices with these two functions.
FLOAT32_UNIT_ROUNDOFF = 2.0**-24


# u-terms of the slack by the float32 search's dot (fastvq.triton.set_fp32_precision; nearest_code_slack
# derives them): "ieee" is every CPU/CUDA kernel and Triton's interpreter; "tf32x3" Triton's default on CUDA.
SLACK_PRECISIONS = ("ieee", "tf32x3", "tf32")


def slack_terms(dim: int, precision: str = "ieee") -> int:
    """The number of unit roundoffs u in nearest_code_slack's bound for d = dim and this precision."""
    if precision not in SLACK_PRECISIONS:
        raise ValueError(f"precision must be one of {SLACK_PRECISIONS}, got {repr(precision)[:40]}")
    if precision == "ieee":
        return dim + 2
    return 3 * dim + 26 + (2**14 if precision == "tf32" else 0)


def nearest_code_slack(x: Tensor, codebook: Tensor, precision: str = "ieee") -> Tensor:
    """(N,) float64: how far two codes' exact distances may be apart and still swap in float32.

    "ieee" (float32 products and sums): an evaluation of ‖e‖² − 2x·e over d terms errs by at most
    about (d+2)·u·(‖x‖² + 2‖e‖²) (u = 2⁻²⁴); two codes can swap only when their exact distances
    differ by less than twice that. Anything further apart is a wrong answer.

    "tf32x3" (the Triton searches' default for float32 operands: Triton's F32DotTC pass per tl.dot over
    a d-slice, or with x resident fastvq's own split, _score_tile.tf32x3_dot, in the same order): a = A + α
    with A = tf32(a) (nearest, 11 significant bits: |α| <= 2⁻¹¹|a|) and α = a − A exact in float32; the
    tensor cores read α as TF32, α̃, off by at most 2⁻¹⁰|α| <= 2⁻²¹|a| (the low 13 bits dropped; half that
    if rounded, as tf32x3_dot does); products of TF32 numbers are exact in float32. The sum
    α̃B + Aβ̃ + AB misses ab by αβ + (α − α̃)B + A(β − β̃): at most (2⁻²² + 2·2⁻²¹(1 + 2⁻¹¹))|ab|,
    under 21u|ab|. Accumulation: the two small dots start from zero, so their partial sums stay below
    2⁻¹⁰·Σ|ab| and their 2d roundings are negligible (2d·2⁻¹⁰·u·Σ|ab|); the big dot adds d products
    onto them and each slice's result is added to the running sum, S <= d/16 + 1 slices: d + S <=
    1.07d + 1 roundings of at most uΣ|ab| each against ieee's d, or twice that (<= 2.2d + 2) for a
    tensor-core accumulator that truncates rather than rounds. So x·e errs by at most
    (2.2d + 23)·u·Σ|x_j e_j|, (1.2d + 23)·u·Σ more than ieee's d·u·Σ; as 2Σ|x_j e_j| <= ‖x‖² + ‖e‖²,
    the score's extra error is at most (1.2d + 23)·u·(‖x‖² + ‖e‖²), within the
    (2d + 24)·u·(‖x‖² + 2‖e‖²) added here: 3d + 26 terms in all.
    "tf32" (one TF32 product, set_fp32_precision("tf32")): A·B misses ab by up to (2⁻¹⁰ + 2⁻²²)|ab|,
    2¹⁴ + 4 u-terms instead of 21: tf32x3's terms plus 2¹⁴ (~1e-3 relative).

    The default stays "ieee": every other kernel multiplies in float32, as does Triton's interpreter except
    where fastvq splits the operands itself (then "tf32x3" applies there too).
    """
    terms = slack_terms(x.shape[-1], precision)
    x64, e64 = x.detach().double(), codebook.detach().double()
    scale = (x64**2).sum(-1) + 2 * (e64**2).sum(-1).max()
    return 2 * terms * FLOAT32_UNIT_ROUNDOFF * scale


def nearest_code_excess(x: Tensor, codebook: Tensor, indices: Tensor, best: Tensor | None = None,
                        precision: str = "ieee") -> Tensor:
    """(N,) float64: (exact distance of the chosen code − exact nearest distance) / slack (at ``precision``,
    nearest_code_slack).

    A row passes when its excess is <= 1. ``best`` is the oracle's choice for these rows
    (computed here when None). Inputs may live on any device; the judge runs on the CPU.
    """
    x, codebook = x.detach().cpu(), codebook.detach().cpu()
    slack = nearest_code_slack(x, codebook, precision)
    chosen = indices.detach().cpu().long()
    if best is None:
        best, _ = nearest_code(x.double(), codebook.double())
    x64, e64 = x.double(), codebook.double()
    d_chosen = ((x64 - e64[chosen]) ** 2).sum(-1)
    d_best = ((x64 - e64[best.cpu()]) ** 2).sum(-1)
    return (d_chosen - d_best) / slack.clamp_min(1e-300)


def assert_nearest(x: Tensor, codebook: Tensor, indices: Tensor, precision: str = "ieee") -> None:
    """Raise AssertionError unless every indices[i] is a nearest code of x[i] (within the slack at
    ``precision``: nearest_code_slack)."""
    slack_terms(x.shape[-1], precision)  # a bad precision is a ValueError even with no rows
    if indices.dtype != torch.int64 or tuple(indices.shape) != tuple(x.shape[:1]):
        raise AssertionError(f"indices must be int64 of shape ({x.shape[0]},), got {indices.dtype} "
                             f"{tuple(indices.shape)}")
    if x.shape[0] == 0:
        return
    best, _ = nearest_code(x.detach().cpu().double(), codebook.detach().cpu().double())
    excess = nearest_code_excess(x, codebook, indices, best, precision)
    if bool((excess <= 1.0).all()):
        return
    worst = int(torch.argmax(excess))
    x64, e64 = x.detach().cpu().double(), codebook.detach().cpu().double()
    chosen, nearest = int(indices[worst]), int(best[worst])
    raise AssertionError(
        f"row {worst}: chose code {chosen} at distance {float(((x64[worst] - e64[chosen]) ** 2).sum())}, "
        f"but code {nearest} is at {float(((x64[worst] - e64[nearest]) ** 2).sum())} "
        f"(excess {float(excess[worst]):.3g} × the {precision} slack)"
    )


def assert_nearest_k(x: Tensor, codebook: Tensor, indices: Tensor, precision: str = "ieee") -> None:
    """Raise AssertionError unless each row of indices (N, k) lists k distinct codes whose exact distances
    are, position by position, within nearest_code_slack (at ``precision``) of the exact k smallest
    distances (sorted)."""
    slack = nearest_code_slack(x, codebook, precision)
    num_rows, k = x.shape[0], (indices.shape[1] if indices.dim() == 2 else -1)
    if indices.dtype != torch.int64 or tuple(indices.shape) != (num_rows, k) or not 1 <= k <= codebook.shape[0]:
        raise AssertionError(f"indices must be int64 of shape ({num_rows}, k) with 1 <= k <= K = "
                             f"{codebook.shape[0]}, got {indices.dtype} {tuple(indices.shape)}")
    if num_rows == 0:
        return
    chosen = indices.detach().cpu()
    if bool(((chosen < 0) | (chosen >= codebook.shape[0])).any()):
        raise AssertionError(f"indices out of [0, {codebook.shape[0]})")
    if k > 1 and bool((chosen.sort(dim=1).values.diff(dim=1) == 0).any()):
        raise AssertionError(f"row {int((chosen.sort(dim=1).values.diff(dim=1) == 0).any(1).nonzero()[0])} "
                             f"lists a code twice")
    x64, e64 = x.detach().cpu().double(), codebook.detach().cpu().double()
    best, _ = nearest_codes(x64, e64, k)
    d_chosen = ((x64[:, None, :] - e64[chosen]) ** 2).sum(-1)
    d_best = ((x64[:, None, :] - e64[best]) ** 2).sum(-1)
    excess = (d_chosen - d_best).abs() / slack.detach().cpu().clamp_min(1e-300)[:, None]
    # Where the true distance is not finite (a non-finite row, or fewer than k finite codes), any code does.
    bad = ~((excess <= 1.0) | ~torch.isfinite(d_best))
    if not bool(bad.any()):
        return
    row, position = (int(i) for i in bad.nonzero()[0])
    raise AssertionError(
        f"row {row}, position {position}: chose code {int(chosen[row, position])} at distance "
        f"{float(d_chosen[row, position])}, but the {position + 1}-th nearest distance is "
        f"{float(d_best[row, position])} (code {int(best[row, position])}; "
        f"excess {float(excess[row, position]):.3g} × the {precision} slack)"
    )


# ---- sample_code: a Gumbel-max draw from softmax(logits / T), noise from a counter-based hash ---
# Every backend computes, for row i (0-based within the call) and code k, with uint32 arithmetic:
#   fmix(h)  = murmur3's finaliser: h ^= h>>16; h *= 0x85EBCA6B; h ^= h>>13; h *= 0xC2B2AE35; h ^= h>>16
#   row_key  = fmix(fmix(i_lo ^ seed_lo) ^ i_hi)       (i_lo, i_hi: the low and high 32 bits of i)
#   code_key = fmix(k ^ seed_hi ^ 0x9E3779B9)          (seed_lo, seed_hi: those of the int64 seed)
#   bits     = fmix(row_key ^ code_key)
#   u        = (2·(bits >> 9) + 1) / 2^24              (exact in float32, strictly inside (0, 1))
#   noise    = float32(T · −log(−log(u)))              (computed in float64, then rounded once)
#   score    = vqp's −logit − noise: sqrt(max(‖x − e‖², 1e-8)) − noise, or −x·e − noise (cosine)
# and returns argmin_k score, ties to the lowest k. The float64 noise rounded once to float32 is
# bitwise the same in every backend, so on integer-valued data (exact distances) every backend
# returns exactly the reference's indices.
SAMPLE_GOLDEN = 0x9E3779B9
_MASK32 = 0xFFFFFFFF


def _mul32(a: Tensor, m: int) -> Tensor:
    """(a·m) mod 2³² for int64 a in [0, 2³²), without int64 overflow."""
    low = (a & 0xFFFF) * m
    high = ((a >> 16) * m) & 0xFFFF
    return (low + (high << 16)) & _MASK32


def _fmix32(h: Tensor) -> Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def sample_noise(seed: int, rows: Tensor, codes: Tensor, temperature: float) -> Tensor:
    """float32 (len(rows), len(codes)): the scaled Gumbel noise T·g of the hash above."""
    seed_lo, seed_hi = seed & _MASK32, (seed >> 32) & _MASK32
    rows, codes = rows.long(), codes.long()
    row_key = _fmix32(_fmix32((rows & _MASK32) ^ seed_lo) ^ ((rows >> 32) & _MASK32))
    code_key = _fmix32(codes ^ seed_hi ^ SAMPLE_GOLDEN)
    bits = _fmix32(row_key[:, None] ^ code_key[None, :])
    u = ((bits >> 9) * 2 + 1).double() / 2.0**24
    return (temperature * -torch.log(-torch.log(u))).to(torch.float32)


def sample_scores(x: Tensor, codebook: Tensor, cosine: bool) -> Tensor:
    """vqp's −logits (N, K), in the compute dtype: sqrt(max(‖x − e‖², 1e-8)), or −x·e. Oracle only."""
    dtype = compute_dtype(x.dtype)
    if cosine:
        return -(x.to(dtype) @ codebook.to(dtype).T)
    return pairwise_sqdist(x, codebook).clamp_min(1e-8).sqrt()


def sample_code(x: Tensor, codebook: Tensor, temperature: float, seed: int, cosine: bool) -> Tensor:
    """indices (N,) int64 = argmin_k (sample_scores − sample_noise), ties to the lowest k. Chunked."""
    num_rows, num_codes, dim = x.shape[0], codebook.shape[0], codebook.shape[1]
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, num_codes * dim))
    codes = torch.arange(num_codes, device=x.device)
    indices = torch.empty(num_rows, dtype=torch.int64, device=x.device)
    for start in range(0, num_rows, rows_per_chunk):
        chunk = x[start : start + rows_per_chunk]
        noise = sample_noise(seed, torch.arange(start, start + chunk.shape[0], device=x.device), codes, temperature)
        score = sample_scores(chunk, codebook, cosine) - noise.to(compute_dtype(x.dtype))
        indices[start : start + rows_per_chunk] = torch.where(torch.isnan(score), torch.inf, score).min(1).indices
    return indices


def assert_sampled(x: Tensor, codebook: Tensor, indices: Tensor, temperature: float, seed: int, cosine: bool) -> None:
    """Raise unless every indices[i] minimises score − noise up to float32 rounding of the score:
    score_c − err_c <= min_k (score_k + err_k) in float64, err bounding each float32 score's error."""
    x64, e64 = x.detach().cpu().double(), codebook.detach().cpu().double()
    noise = sample_noise(seed, torch.arange(x.shape[0]), torch.arange(codebook.shape[0]), temperature).double()
    scores = sample_scores(x64, e64, cosine)
    perturbed = scores - noise
    dim, unit = x.shape[1], FLOAT32_UNIT_ROUNDOFF
    if cosine:
        err = (dim + 2) * unit * (x64.abs() @ e64.abs().T)
    else:  # ‖x − e‖² errs by at most s_err; its square root by s_err / (2·sqrt) (and never more than sqrt(s_err))
        s_err = nearest_code_slack(x, codebook)[:, None] / 2
        err = torch.minimum(s_err / (2 * scores), s_err.sqrt()) + 2 * unit * scores
    err = err + 2 * unit * perturbed.abs()
    chosen = indices.detach().cpu().long()
    low = perturbed.gather(1, chosen[:, None])[:, 0] - err.gather(1, chosen[:, None])[:, 0]
    best = (perturbed + err).min(1).values
    bad = torch.nonzero(low > best).flatten()
    if bad.numel():
        row = int(bad[0])
        raise AssertionError(f"row {row}: sampled code {int(chosen[row])} with perturbed score "
                             f"{float(perturbed[row, chosen[row]])}, but code {int(perturbed[row].argmin())} has "
                             f"{float(perturbed[row].min())} ({bad.numel()} such rows)")


def vq_loss(x: Tensor, quantized: Tensor, commitment_weight: float, codebook_weight: float) -> Tensor:
    """commitment_weight·mean((x − sg(q))²) + codebook_weight·mean((sg(x) − q)²); 0 for empty x."""
    if x.numel() == 0:
        return torch.zeros((), dtype=compute_dtype(x.dtype), device=x.device)
    dtype = compute_dtype(x.dtype)
    x, quantized = x.to(dtype), quantized.to(dtype)
    commitment = ((x - quantized.detach()) ** 2).mean()
    codebook_loss = ((x.detach() - quantized) ** 2).mean()
    return commitment_weight * commitment + codebook_weight * codebook_loss


# vector-quantize-pytorch's safe division: norms are clamped to at least this.
ROTATION_EPS = 1e-6


def rotate_to(x: Tensor, quantized: Tensor) -> Tensor:
    """The rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation
    Trick", §4.2), written as vector-quantize-pytorch 1.32 writes it, for rows (..., d).

    Value: R·x·(‖q‖/‖x‖) with R = I − 2wwᵀ + 2q̂x̂ᵀ, w = (x̂ + q̂)/‖x̂ + q̂‖, which is q itself up to
    rounding. Everything but x is detached, so the gradient is grad_x = (‖q‖/‖x‖)·Rᵀ·g and q
    gets none. Norms are clamped to ROTATION_EPS, so x = 0 gives 0 (vqp's safe division).
    """
    dtype = compute_dtype(x.dtype)
    x, quantized = x.to(dtype), quantized.to(dtype)
    x_norm = x.norm(dim=-1, keepdim=True).clamp_min(ROTATION_EPS)
    q_norm = quantized.norm(dim=-1, keepdim=True)
    x_unit = (x / x_norm).detach()
    q_unit = (quantized / q_norm.clamp_min(ROTATION_EPS)).detach()
    w = torch.nn.functional.normalize(x_unit + q_unit, dim=-1, eps=ROTATION_EPS).detach()
    rotated = (x - 2 * (x * w).sum(-1, keepdim=True) * w
               + 2 * (x * x_unit).sum(-1, keepdim=True) * q_unit)
    return rotated * (q_norm / x_norm).detach()


def quantize(
    x: Tensor, codebook: Tensor, commitment_weight: float = 0.0, codebook_weight: float = 0.0,
    rotation_trick: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable reference of the fused ``quantize`` op for x of shape (N, d).

    Returns (quantized, indices, loss). ``quantized`` has x's dtype, takes the
    straight-through gradient to x (or the rotation trick's, ``rotate_to``), and no
    gradient to the codebook; the codebook learns only through the codebook term of ``loss``.
    """
    indices, _ = nearest_code(x.detach(), codebook.detach())
    codes = codebook[indices]
    loss = vq_loss(x, codes, commitment_weight, codebook_weight)
    if rotation_trick:
        quantized = rotate_to(x, codes.detach()).to(x.dtype)
    else:
        quantized = x + (codes.to(x.dtype) - x).detach()
    return quantized, indices, loss


def ema_stats(x: Tensor, indices: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """counts (K,) and per-code sums (K, d) of the rows of x assigned to each code."""
    dtype = compute_dtype(x.dtype)
    counts = torch.bincount(indices, minlength=num_codes).to(dtype)
    sums = torch.zeros(num_codes, x.shape[1], dtype=dtype, device=x.device)
    sums.index_add_(0, indices, x.to(dtype))
    return counts, sums


def quantize_backward(
    grad_quantized: Tensor,
    x: Tensor,
    codebook: Tensor,
    indices: Tensor,
    commit_scale: Tensor,
    codebook_scale: Tensor,
    rotation_trick: bool = False,
) -> tuple[Tensor, Tensor]:
    """Gradients of the fused op, written out by hand.

    grad_x = G + commit_scale·(x − e_idx), where G = grad_quantized (straight-through) or,
             with the rotation trick, G = s·(g − 2w(w·g) + 2x̂(q̂·g)) = s·Rᵀg (see rotate_to)
    grad_codebook_k = codebook_scale · Σ_{i: idx_i = k} (e_k − x_i)
    where commit_scale = dL·commitment_weight·2/(N·d), likewise codebook_scale.
    """
    dtype = compute_dtype(x.dtype)
    x_c, codes, grad = x.to(dtype), codebook.to(dtype)[indices], grad_quantized.to(dtype)
    residual = x_c - codes
    if rotation_trick:
        x_norm = x_c.norm(dim=-1, keepdim=True).clamp_min(ROTATION_EPS)
        q_norm = codes.norm(dim=-1, keepdim=True)
        x_unit, q_unit = x_c / x_norm, codes / q_norm.clamp_min(ROTATION_EPS)
        w = torch.nn.functional.normalize(x_unit + q_unit, dim=-1, eps=ROTATION_EPS)
        grad = (q_norm / x_norm) * (grad - 2 * w * (w * grad).sum(-1, keepdim=True)
                                    + 2 * x_unit * (q_unit * grad).sum(-1, keepdim=True))
    grad_x = grad + commit_scale.to(dtype) * residual
    grad_codebook = torch.zeros(codebook.shape, dtype=dtype, device=codebook.device)
    grad_codebook.index_add_(0, indices, -residual)
    grad_codebook = codebook_scale.to(dtype) * grad_codebook
    return grad_x.to(x.dtype), grad_codebook.to(codebook.dtype)


def laplace_smoothed_counts(cluster_size: Tensor, eps: float) -> Tensor:
    """ñ_k = (n_k + eps) / (Σn + K·eps) · Σn, which keeps every ñ_k > 0. Σn is summed in float64 and
    rounded once (a float32 sum's rounding depends on its order)."""
    total = cluster_size.double().sum().to(cluster_size.dtype)
    return (cluster_size + eps) / (total + cluster_size.numel() * eps) * total


def ema_update(
    embed: Tensor,
    cluster_size: Tensor,
    embed_avg: Tensor,
    counts: Tensor,
    sums: Tensor,
    decay: float,
    eps: float,
) -> None:
    """One EMA codebook step, in place: lerp the statistics, then embed = embed_avg / ñ.

    A code whose smoothed count is 0 has no statistics left (only possible with decay = 0
    and eps = 0, or an empty batch with decay = 0) and keeps its value instead of 0/0.
    """
    cluster_size.lerp_(counts.to(cluster_size.dtype), 1.0 - decay)
    embed_avg.lerp_(sums.to(embed_avg.dtype), 1.0 - decay)
    smoothed = laplace_smoothed_counts(cluster_size, eps).unsqueeze(1)
    embed.copy_(torch.where(smoothed > 0, embed_avg / smoothed, embed))


def ema_vq_step(
    x: Tensor,
    embed: Tensor,
    cluster_size: Tensor,
    embed_avg: Tensor,
    *,
    decay: float,
    eps: float,
    commitment_weight: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One training step of an EMA vector quantizer on x (N, d), updating the state in place.

    Order: search against the current codebook, quantize with those (pre-update)
    rows, commitment loss, then the EMA update.
    """
    quantized, indices, loss = quantize(x, embed, commitment_weight, 0.0)
    with torch.no_grad():
        counts, sums = ema_stats(x.detach(), indices, embed.shape[0])
        ema_update(embed, cluster_size, embed_avg, counts, sums, decay, eps)
    return quantized, indices, loss
