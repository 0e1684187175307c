// ema_stats on CUDA: per-code counts and row sums, by atomics (ema_stats) or by a
// deterministic sort-and-segment reduction (segment_sum; the caller sorts the indices).
//
// Why atomics by default: one pass over x, no sort, and the K·d targets are spread widely, so
// contention is low for any codebook in use. Counts are 64-bit integer atomics, exact for any N
// (float32 ones stop at 2^24 per code, issue 14 finding 7); sums are float64 atomics (a float32
// sum over millions of rows loses its low bits); the caller rounds both to float32 once. The
// float64 sums' order-dependent rounding is far below float32's last bit. segment_sum gives
// bitwise-reproducible sums at the cost of a sort and of serialising rows that share a code.
#include "cuda/common.cuh"

namespace fastvq::cuda {
namespace {

// One warp per row (grid-striding), lanes across columns: coalesced reads and atomics.
template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, 4)
    ema_stats_kernel(const T* __restrict__ x, int64_t n, int64_t d, int64_t stride_xn, int64_t stride_xd,
                     const int64_t* __restrict__ indices, int64_t k, unsigned long long* __restrict__ counts,
                     double* __restrict__ sums) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; row < n; row += warps) {
    const int64_t code = indices[row];
    if (code < 0 || code >= k) continue;  // uniform across the warp
    if (lane == 0) atomicAdd(counts + code, 1ull);
    for (int64_t c = lane; c < d; c += 32)
      atomicAdd(sums + code * d + c, static_cast<double>(to_float(x[row * stride_xn + c * stride_xd])));
  }
}

constexpr int kSegmentCols = 32;    // columns per block (one per lane)
constexpr int kSegmentGroups = 8;   // row groups per block, summed in a fixed order at the end

// Block (code, column slice): group g sums rows perm[offsets[code] + g], + 8, + 16, ... in that
// order, then group 0 adds the 8 partial sums in order. Fixed work split, fixed order: the
// result is the same on every run.
template <typename T>
__global__ void __launch_bounds__(kSegmentCols * kSegmentGroups)
    segment_sum_kernel(const T* __restrict__ x, int64_t d, int64_t stride_xn, int64_t stride_xd,
                       const int64_t* __restrict__ perm, const int64_t* __restrict__ offsets,
                       const T* __restrict__ codebook, float* __restrict__ out) {
  __shared__ float partial[kSegmentGroups][kSegmentCols];
  const int64_t code = blockIdx.x;
  const int lane = threadIdx.x, group = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kSegmentCols + lane;
  const bool real = col < d;
  const int64_t start = offsets[code], end = offsets[code + 1];
  const float e = (codebook != nullptr && real) ? to_float(codebook[code * d + col]) : 0.f;
  float acc = 0.f;
  if (real) {
    for (int64_t s = start + group; s < end; s += kSegmentGroups) {
      const float v = to_float(x[perm[s] * stride_xn + col * stride_xd]);
      acc += codebook != nullptr ? e - v : v;
    }
  }
  partial[group][lane] = acc;
  __syncthreads();
  if (group == 0 && real) {
    float total = 0.f;
#pragma unroll
    for (int g = 0; g < kSegmentGroups; ++g) total += partial[g][lane];
    out[code * d + col] = total;
  }
}

}  // namespace

void ema_stats(int device, std::uintptr_t stream, DType dtype, Strided x, int64_t n, int64_t d,
               const int64_t* indices, int64_t k, int64_t* counts_out, double* sums_out) {
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  check_cuda(cudaMemsetAsync(counts_out, 0, sizeof(int64_t) * k, s), "cudaMemsetAsync(counts_out)");
  check_cuda(cudaMemsetAsync(sums_out, 0, sizeof(double) * k * d, s), "cudaMemsetAsync(sums_out)");
  if (n == 0) return;
  const auto blocks = static_cast<unsigned>(std::min(ceil_div(n, kWarpsPerBlock), kMaxRowBlocks));
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    ema_stats_kernel<T><<<blocks, kWarpsPerBlock * 32, 0, s>>>(static_cast<const T*>(x.data), n, d, x.stride_row,
                                                              x.stride_col, indices, k,
                                                              reinterpret_cast<unsigned long long*>(counts_out),
                                                              sums_out);
    check_launch("ema_stats_kernel launch");
  });
}

void segment_sum(int device, std::uintptr_t stream, DType dtype, Strided x, int64_t d, const int64_t* perm,
                 const int64_t* offsets, int64_t k, const void* codebook, float* out) {
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  const dim3 grid(static_cast<unsigned>(k), static_cast<unsigned>(ceil_div(d, kSegmentCols)));
  const dim3 block(kSegmentCols, kSegmentGroups);
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    segment_sum_kernel<T><<<grid, block, 0, s>>>(static_cast<const T*>(x.data), d, x.stride_row, x.stride_col,
                                                 perm, offsets, static_cast<const T*>(codebook), out);
    check_launch("segment_sum_kernel launch");
  });
}

}  // namespace fastvq::cuda
