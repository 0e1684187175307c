// quantize_backward on CUDA:
//     grad_x          = G + commit_scale · (x − e_idx)                       (G: see below, + commitment)
//     grad_codebook_k = Σ_{i: idx_i = k} (e_k − x_i)                        (scaled by the caller)
// G = grad_quantized (straight-through), or with the rotation trick (Fifty et al. 2024, as
// vector-quantize-pytorch writes it; fastvq/reference.py: rotate_to), per row with q = e_idx,
// g = grad_quantized and vqp's safe division (ε = 1e-6):
//     n_x = max(‖x‖, ε), u = x/n_x, q̂ = q/max(‖q‖, ε), a = u + q̂, w = a/max(‖a‖, ε), s = ‖q‖/n_x
//     G = s·(g − 2w(w·g) + 2u(q̂·g))                                         (= s·Rᵀg; R is never built)
// One warp per row (grid-striding), lanes across columns: the straight-through kernel reads each
// row's x, e_idx and grad_quantized once; the rotation kernel reads them in three passes (‖x‖ and
// ‖q‖; then ‖a‖, a·g and q̂·g from a formed elementwise; then the write), the row sums reduced by
// warp shuffles, all in float32. grad_x is written in x's dtype (rounded once, to nearest even) and
// −(x − e_idx) is scattered into a float64 (K, d) buffer with atomics (float32 ones would lose the
// low bits of a code's sum over millions of rows); the caller scales it and rounds once. The deterministic
// alternative for the codebook gradient is segment_sum (ema_stats.cu) with the codebook given.
// commit_scale is read from device memory, so nothing waits for the host.
#include "cuda/common.cuh"

namespace fastvq::cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, 4)
    quantize_backward_kernel(const T* __restrict__ grad_q, int64_t stride_gn, int64_t stride_gd,
                             const T* __restrict__ x, int64_t stride_xn, int64_t stride_xd, int64_t n, int64_t d,
                             const T* __restrict__ codebook, const int64_t* __restrict__ indices, int64_t k,
                             const float* __restrict__ commit_scale, T* __restrict__ grad_x,
                             double* __restrict__ grad_codebook_acc) {
  const int lane = threadIdx.x % 32;
  const float scale = grad_x != nullptr ? *commit_scale : 0.f;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; row < n; row += warps) {
    const int64_t code = indices[row];
    const bool valid = code >= 0 && code < k;  // an invalid index contributes a zero residual
    for (int64_t c = lane; c < d; c += 32) {
      const float residual =
          valid ? to_float(x[row * stride_xn + c * stride_xd]) - to_float(codebook[code * d + c]) : 0.f;
      if (grad_x != nullptr) {
        const float g = to_float(grad_q[row * stride_gn + c * stride_gd]);
        grad_x[row * d + c] = from_float<T>(fmaf(scale, residual, g));
      }
      if (grad_codebook_acc != nullptr && valid) atomicAdd(grad_codebook_acc + code * d + c, static_cast<double>(-residual));
    }
  }
}

// vector-quantize-pytorch's safe division: norms are clamped to at least this (fastvq.ops.ROTATION_EPS).
constexpr float kRotationEps = 1e-6f;

// The warp's total of v, in every lane. The butterfly adds the same two partial sums in each
// pair of lanes (a + b == b + a), so every lane holds bitwise the same value.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The rotation trick's grad_x (needs grad_x); the codebook scatter as in quantize_backward_kernel.
// Every lane of a warp walks the same rows, so the full-mask shuffles are safe. An invalid index
// reads x and q as 0 (so G = 0 and grad_x = 0) and scatters nothing.
template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, 4)
    quantize_backward_rotation_kernel(const T* __restrict__ grad_q, int64_t stride_gn, int64_t stride_gd,
                                      const T* __restrict__ x, int64_t stride_xn, int64_t stride_xd, int64_t n,
                                      int64_t d, const T* __restrict__ codebook, const int64_t* __restrict__ indices,
                                      int64_t k, const float* __restrict__ commit_scale, T* __restrict__ grad_x,
                                      double* __restrict__ grad_codebook_acc) {
  const int lane = threadIdx.x % 32;
  const float scale = *commit_scale;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; row < n; row += warps) {
    const int64_t code = indices[row];
    const bool valid = code >= 0 && code < k;
    const T* xr = x + row * stride_xn;
    const T* gr = grad_q + row * stride_gn;
    const T* q = codebook + (valid ? code : 0) * d;
    auto x_at = [&](int64_t c) { return valid ? to_float(xr[c * stride_xd]) : 0.f; };
    auto q_at = [&](int64_t c) { return valid ? to_float(q[c]) : 0.f; };

    // Pass 1: ‖x‖², ‖q‖² (the same operations on both, so x = −q gives equal norms and a = 0 exactly).
    float x_sq = 0.f, q_sq = 0.f;
    for (int64_t c = lane; c < d; c += 32) {
      const float xv = x_at(c), qv = q_at(c);
      x_sq = fmaf(xv, xv, x_sq);
      q_sq = fmaf(qv, qv, q_sq);
    }
    const float x_norm = fmaxf(sqrtf(warp_sum(x_sq)), kRotationEps);
    const float q_norm = sqrtf(warp_sum(q_sq));
    const float q_div = fmaxf(q_norm, kRotationEps);

    // Pass 2: ‖a‖², a·g, q̂·g, with a = u + q̂ formed elementwise.
    float a_sq = 0.f, a_dot_g = 0.f, qhat_dot_g = 0.f;
    for (int64_t c = lane; c < d; c += 32) {
      const float g = to_float(gr[c * stride_gd]);
      const float qhat = q_at(c) / q_div;
      const float a = x_at(c) / x_norm + qhat;
      a_sq = fmaf(a, a, a_sq);
      a_dot_g = fmaf(a, g, a_dot_g);
      qhat_dot_g = fmaf(qhat, g, qhat_dot_g);
    }
    const float a_div = fmaxf(sqrtf(warp_sum(a_sq)), kRotationEps);
    const float two_w_dot_g = 2.f * (warp_sum(a_dot_g) / a_div);
    const float two_qhat_dot_g = 2.f * warp_sum(qhat_dot_g);
    const float s = q_norm / x_norm;

    // Pass 3: grad_x = s·(g − 2w(w·g) + 2u(q̂·g)) + commit_scale·(x − q), and the scatter.
    for (int64_t c = lane; c < d; c += 32) {
      const float xv = x_at(c), qv = q_at(c), g = to_float(gr[c * stride_gd]);
      const float u = xv / x_norm;
      const float w = (u + qv / q_div) / a_div;
      const float rotated = s * (g - w * two_w_dot_g + u * two_qhat_dot_g);
      const float residual = xv - qv;
      grad_x[row * d + c] = from_float<T>(fmaf(scale, residual, rotated));
      if (grad_codebook_acc != nullptr && valid) atomicAdd(grad_codebook_acc + code * d + c, static_cast<double>(-residual));
    }
  }
}

}  // namespace

void quantize_backward(int device, std::uintptr_t stream, DType dtype, Strided grad_quantized, Strided x,
                       int64_t n, int64_t d, const void* codebook, const int64_t* indices, int64_t k,
                       const float* commit_scale, bool rotation_trick, void* grad_x_out,
                       double* grad_codebook_acc) {
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  if (grad_codebook_acc != nullptr)
    check_cuda(cudaMemsetAsync(grad_codebook_acc, 0, sizeof(double) * k * d, s), "cudaMemsetAsync(grad_codebook)");
  if (n == 0 || (grad_x_out == nullptr && grad_codebook_acc == nullptr)) return;
  const auto blocks = static_cast<unsigned>(std::min(ceil_div(n, kWarpsPerBlock), kMaxRowBlocks));
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    if (rotation_trick && grad_x_out != nullptr) {
      quantize_backward_rotation_kernel<T><<<blocks, kWarpsPerBlock * 32, 0, s>>>(
          static_cast<const T*>(grad_quantized.data), grad_quantized.stride_row, grad_quantized.stride_col,
          static_cast<const T*>(x.data), x.stride_row, x.stride_col, n, d, static_cast<const T*>(codebook), indices,
          k, commit_scale, static_cast<T*>(grad_x_out), grad_codebook_acc);
      check_launch("quantize_backward_rotation_kernel launch");
      return;
    }
    quantize_backward_kernel<T><<<blocks, kWarpsPerBlock * 32, 0, s>>>(
        static_cast<const T*>(grad_quantized.data), grad_quantized.stride_row, grad_quantized.stride_col,
        static_cast<const T*>(x.data), x.stride_row, x.stride_col, n, d, static_cast<const T*>(codebook), indices, k,
        commit_scale, static_cast<T*>(grad_x_out), grad_codebook_acc);
    check_launch("quantize_backward_kernel launch");
  });
}

}  // namespace fastvq::cuda
