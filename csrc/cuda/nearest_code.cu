// nearest_code on CUDA: the search (a GEMM with a min-epilogue) fused with the gather.
//
// The search runs in a centred frame (issue 12, finding 5): ‖e‖² − 2x·e cancels far from the
// origin, so with c = fastvq.numerics.search_centre(codebook) (the caller's `centre`) every x
// and code value is loaded as v − c (float32), and the code norms are ‖e − c‖². sqdist and the
// gather use the original values.
//
// A thread block owns kTileN = 64 rows of x. It walks the codebook in kTileK = 64-code tiles;
// for each tile it stages x and the codebook through shared memory kTileD = 32 columns at a
// time (converted to float32) and each of its 16×16 threads accumulates a 4×4 register tile
// of dot products x_i·e_k in float32 (rows ty + 16·a, codes tx + 16·b). With ‖e_k‖² computed
// once per call by code_norms_kernel,
//     score(i, k) = ‖e_k‖² − 2·x_i·e_k     (‖x_i − e_k‖² − ‖x_i‖²: same argmin per row)
// A NaN or ±inf score counts as +inf. Each thread keeps a running (min, argmin) per row over
// the codes it owns, visited in increasing order and replaced only when strictly smaller, so
// it holds the lowest index among its ties. After the last tile the 16 threads that share a
// row (one half-warp) combine their pairs with a warp-shuffle butterfly that prefers the
// smaller score and, on equal scores, the smaller index: ties go to the lowest index overall,
// and a row whose every score is non-finite keeps index 0. The same half-warp then gathers
// e_idx, writes it to quantized_out and measures sqdist = ‖x_i − e_idx‖² directly; it also
// records the lowest finite row with ‖x_i − c‖² > kMaxCentredSquaredNorm (an atomic min on
// first_bad_row), where a float32 search could overflow: the caller raises on it.
// Memory: O(N + K·d); no N×K buffer.
#include "cuda/common.cuh"

namespace fastvq::cuda {
namespace {

constexpr int kTileN = 64;
constexpr int kTileK = 64;
constexpr int kTileD = 32;
constexpr int kThreadsX = 16;  // threads along codes
constexpr int kThreadsY = 16;  // threads along rows
constexpr int kThreads = kThreadsX * kThreadsY;
constexpr int kRowsPerThread = kTileN / kThreadsY;   // 4
constexpr int kCodesPerThread = kTileK / kThreadsX;  // 4
constexpr unsigned kFullMask = 0xffffffffu;
// FLT_MAX / 8 (fastvq.numerics.MAX_CENTRED_SQUARED_NORM; csrc/cpu/pack_codebook.h).
constexpr float kMaxCentredSquaredNorm = 3.40282346638528859812e+38f / 8.0f;

static_assert(kThreadsX == 16, "the butterfly below reduces over half-warps of 16 lanes");
static_assert(kThreads % 32 == 0, "whole warps only");

// One warp per code: ‖e_k − c‖² in float32.
template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    code_norms_kernel(const T* __restrict__ codebook, int64_t k, int64_t d, const float* __restrict__ centre,
                      float* __restrict__ norms) {
  const int lane = threadIdx.x % 32;
  const int64_t code = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (code >= k) return;  // whole warps leave together
  float sum = 0.f;
  for (int64_t c = lane; c < d; c += 32) {
    const float v = to_float(codebook[code * d + c]) - centre[c];
    sum = fmaf(v, v, sum);
  }
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(kFullMask, sum, offset);
  if (lane == 0) norms[code] = sum;
}

__device__ __forceinline__ void keep_better(float& score, int64_t& index, float other_score, int64_t other_index) {
  if (other_score < score || (other_score == score && other_index < index)) {
    score = other_score;
    index = other_index;
  }
}

// At most 128 registers per thread (two 256-thread blocks per SM); without the minimum-blocks
// bound ptxas held this kernel to 64 registers and spilled (CUDA 13.0, sm_80).
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    nearest_code_kernel(const T* __restrict__ x, int64_t n, int64_t d, int64_t stride_xn, int64_t stride_xd,
                        const T* __restrict__ codebook, int64_t k, const float* __restrict__ centre,
                        const float* __restrict__ code_norms, int64_t* __restrict__ indices_out,
                        float* __restrict__ sqdist_out, T* __restrict__ quantized_out,
                        unsigned long long* __restrict__ first_bad_row) {
  // Transposed tiles, padded by one column so the transposing stores are bank-conflict free.
  __shared__ float xs[kTileD][kTileN + 1];
  __shared__ float es[kTileD][kTileK + 1];

  const int tid = threadIdx.x;
  const int tx = tid % kThreadsX;
  const int ty = tid / kThreadsX;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const float inf = __int_as_float(0x7f800000);

  float best[kRowsPerThread];
  int64_t best_index[kRowsPerThread];
#pragma unroll
  for (int a = 0; a < kRowsPerThread; ++a) {
    best[a] = inf;
    best_index[a] = 0;
  }

  for (int64_t k0 = 0; k0 < k; k0 += kTileK) {
    float acc[kRowsPerThread][kCodesPerThread];
#pragma unroll
    for (int a = 0; a < kRowsPerThread; ++a)
#pragma unroll
      for (int b = 0; b < kCodesPerThread; ++b) acc[a][b] = 0.f;

    for (int64_t d0 = 0; d0 < d; d0 += kTileD) {
      // Consecutive threads take consecutive columns: coalesced reads when x's columns are.
      for (int e = tid; e < kTileN * kTileD; e += kThreads) {
        const int r = e / kTileD, c = e % kTileD;
        const int64_t row = row0 + r, col = d0 + c;
        xs[c][r] = (row < n && col < d) ? to_float(x[row * stride_xn + col * stride_xd]) - centre[col] : 0.f;
      }
      for (int e = tid; e < kTileK * kTileD; e += kThreads) {
        const int r = e / kTileD, c = e % kTileD;
        const int64_t code = k0 + r, col = d0 + c;
        es[c][r] = (code < k && col < d) ? to_float(codebook[code * d + col]) - centre[col] : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int dd = 0; dd < kTileD; ++dd) {
        float xa[kRowsPerThread], eb[kCodesPerThread];
#pragma unroll
        for (int a = 0; a < kRowsPerThread; ++a) xa[a] = xs[dd][ty + kThreadsY * a];
#pragma unroll
        for (int b = 0; b < kCodesPerThread; ++b) eb[b] = es[dd][tx + kThreadsX * b];
#pragma unroll
        for (int a = 0; a < kRowsPerThread; ++a)
#pragma unroll
          for (int b = 0; b < kCodesPerThread; ++b) acc[a][b] = fmaf(xa[a], eb[b], acc[a][b]);
      }
      __syncthreads();  // before the next chunk overwrites the tiles
    }

#pragma unroll
    for (int b = 0; b < kCodesPerThread; ++b) {  // increasing code order within this thread
      const int64_t code = k0 + tx + kThreadsX * b;
      if (code >= k) continue;
      const float norm = code_norms[code];
#pragma unroll
      for (int a = 0; a < kRowsPerThread; ++a) {
        float score = fmaf(-2.f, acc[a][b], norm);
        if (!isfinite(score)) score = inf;
        if (score < best[a]) {
          best[a] = score;
          best_index[a] = code;
        }
      }
    }
  }

  // Every lane runs every shuffle (full mask); only the writes depend on the row being real.
#pragma unroll
  for (int a = 0; a < kRowsPerThread; ++a) {
    float score = best[a];
    int64_t index = best_index[a];
    for (int offset = kThreadsX / 2; offset > 0; offset >>= 1) {
      const float other_score = __shfl_xor_sync(kFullMask, score, offset);
      const int64_t other_index = __shfl_xor_sync(kFullMask, index, offset);
      keep_better(score, index, other_score, other_index);
    }
    const int64_t row = row0 + ty + kThreadsY * a;
    const bool real = row < n;
    float partial = 0.f, centred_norm = 0.f;
    int non_finite = 0;
    if (real) {
      const T* code_row = codebook + index * d;
      for (int64_t c = tx; c < d; c += kThreadsX) {
        const T e = code_row[c];
        const float xv = to_float(x[row * stride_xn + c * stride_xd]);
        const float diff = xv - to_float(e);
        partial = fmaf(diff, diff, partial);
        const float centred = xv - centre[c];
        centred_norm = fmaf(centred, centred, centred_norm);
        non_finite += !isfinite(xv);
        if (quantized_out != nullptr) quantized_out[row * d + c] = e;
      }
    }
    for (int offset = kThreadsX / 2; offset > 0; offset >>= 1) {
      partial += __shfl_xor_sync(kFullMask, partial, offset);
      centred_norm += __shfl_xor_sync(kFullMask, centred_norm, offset);
      non_finite += __shfl_xor_sync(kFullMask, non_finite, offset);
    }
    if (real && tx == 0) {
      indices_out[row] = index;
      sqdist_out[row] = partial;
      if (non_finite == 0 && !(centred_norm <= kMaxCentredSquaredNorm))
        atomicMin(first_bad_row, static_cast<unsigned long long>(row));
    }
  }
}

}  // namespace

void nearest_code(int device, std::uintptr_t stream, DType dtype, Strided x, int64_t n, int64_t d,
                  const void* codebook, int64_t k, const float* centre, float* code_norms_scratch,
                  int64_t* indices_out, float* sqdist_out, void* quantized_out, int64_t* first_bad_row) {
  if (n == 0) return;
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    const T* cb = static_cast<const T*>(codebook);
    code_norms_kernel<T><<<static_cast<unsigned>(ceil_div(k, kWarpsPerBlock)), kWarpsPerBlock * 32, 0, s>>>(
        cb, k, d, centre, code_norms_scratch);
    check_launch("code_norms_kernel launch");
    nearest_code_kernel<T><<<static_cast<unsigned>(ceil_div(n, kTileN)), kThreads, 0, s>>>(
        static_cast<const T*>(x.data), n, d, x.stride_row, x.stride_col, cb, k, centre, code_norms_scratch,
        indices_out, sqdist_out, static_cast<T*>(quantized_out),
        reinterpret_cast<unsigned long long*>(first_bad_row));
    check_launch("nearest_code_kernel launch");
  });
}

}  // namespace fastvq::cuda
