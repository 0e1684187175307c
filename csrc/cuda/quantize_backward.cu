// quantize_backward on CUDA:
//     grad_x          = grad_quantized + commit_scale · (x − e_idx)        (straight-through + commitment)
//     grad_codebook_k = Σ_{i: idx_i = k} (e_k − x_i)                        (scaled by the caller)
// One warp per row (grid-striding), lanes across columns: each row's x, e_idx and grad_quantized
// are read once; grad_x is written in x's dtype (rounded once, to nearest even) and −(x − e_idx)
// is scattered into a float32 (K, d) buffer with atomics. The deterministic alternative for the
// codebook gradient is segment_sum (ema_stats.cu) with the codebook given. commit_scale is read
// from device memory, so nothing waits for the host.
#include "cuda/common.cuh"

namespace fastvq::cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, 4)
    quantize_backward_kernel(const T* __restrict__ grad_q, int64_t stride_gn, int64_t stride_gd,
                             const T* __restrict__ x, int64_t stride_xn, int64_t stride_xd, int64_t n, int64_t d,
                             const T* __restrict__ codebook, const int64_t* __restrict__ indices, int64_t k,
                             const float* __restrict__ commit_scale, T* __restrict__ grad_x,
                             float* __restrict__ grad_codebook_acc) {
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
      if (grad_codebook_acc != nullptr && valid) atomicAdd(grad_codebook_acc + code * d + c, -residual);
    }
  }
}

}  // namespace

void quantize_backward(int device, std::uintptr_t stream, DType dtype, Strided grad_quantized, Strided x,
                       int64_t n, int64_t d, const void* codebook, const int64_t* indices, int64_t k,
                       const float* commit_scale, void* grad_x_out, float* grad_codebook_acc) {
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  if (grad_codebook_acc != nullptr)
    check_cuda(cudaMemsetAsync(grad_codebook_acc, 0, sizeof(float) * k * d, s), "cudaMemsetAsync(grad_codebook)");
  if (n == 0 || (grad_x_out == nullptr && grad_codebook_acc == nullptr)) return;
  const auto blocks = static_cast<unsigned>(std::min(ceil_div(n, kWarpsPerBlock), kMaxRowBlocks));
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    quantize_backward_kernel<T><<<blocks, kWarpsPerBlock * 32, 0, s>>>(
        static_cast<const T*>(grad_quantized.data), grad_quantized.stride_row, grad_quantized.stride_col,
        static_cast<const T*>(x.data), x.stride_row, x.stride_col, n, d, static_cast<const T*>(codebook), indices, k,
        commit_scale, static_cast<T*>(grad_x_out), grad_codebook_acc);
    check_launch("quantize_backward_kernel launch");
  });
}

}  // namespace fastvq::cuda
