// The CUDA kernels' host-side entry points (fastvq._cuda), free of CUDA and nanobind types.
//
// Every function:
//  - runs under `device` (restoring the caller's current device afterwards) and enqueues its
//    work on `stream`, the caller's cudaStream_t passed as an integer (Python:
//    torch.cuda.current_stream(device).cuda_stream); nothing synchronises with the host;
//  - writes only into outputs the caller allocated (torch's caching allocator), never allocates;
//  - checks every launch with cudaGetLastError and throws std::runtime_error naming the kernel and
//    the CUDA error. Errors raised later by the device (e.g. an illegal address) surface at the
//    caller's next synchronising CUDA call, as for any asynchronous CUDA work.
// Arrays: `x` (and grad_quantized) may have any strides, in elements; every other array is
// C-contiguous. Indices are int64; an index outside [0, K) is ignored by every kernel (the
// Python layer rejects such indices; the kernels still never read or write out of bounds).
#pragma once

#include <cstdint>
#include <string>

namespace fastvq::cuda {

enum class DType { Float32, Float16, BFloat16 };

struct Strided {  // a 2-d view with element strides
  const void* data;
  int64_t stride_row;
  int64_t stride_col;
};

// indices_out[i] = argmin_k ‖x_i − e_k‖² (ties to the lowest k; a NaN/±inf distance counts as
// +inf, so a row of x with a NaN/Inf gets index 0), searched in the frame centred on `centre`
// (float32 (d,), fastvq.numerics.search_centre); sqdist_out[i] = ‖x_i − e_idx‖² computed
// directly in float32; quantized_out (may be null, (N, d) contiguous, dtype) = codebook[idx].
// code_norms_scratch: float32 (K,), overwritten with ‖e_k − c‖². first_bad_row: int64 (1,), which
// the caller sets to N; lowered (atomic min) to the first finite row with ‖x_i − c‖² > FLT_MAX/8.
void nearest_code(int device, std::uintptr_t stream, DType dtype, Strided x, int64_t n, int64_t d,
                  const void* codebook, int64_t k, const float* centre, float* code_norms_scratch,
                  int64_t* indices_out, float* sqdist_out, void* quantized_out, int64_t* first_bad_row);

// counts_out int64 (K,) and sums_out float64 (K, d), overwritten: per-code counts and row sums,
// with 64-bit atomics (counts exact for any N; the sums' order-dependent rounding is far below
// float32's last bit, the caller rounds both to float32).
void ema_stats(int device, std::uintptr_t stream, DType dtype, Strided x, int64_t n, int64_t d,
               const int64_t* indices, int64_t k, int64_t* counts_out, double* sums_out);

// Deterministic per-code sums: rows perm[offsets[c]:offsets[c+1]] belong to code c (offsets has
// K + 1 entries). out (K, d) float32, overwritten with Σ x_i, or Σ (codebook_c − x_i) when
// codebook is non-null. The additions happen in the same order on every run.
void segment_sum(int device, std::uintptr_t stream, DType dtype, Strided x, int64_t d, const int64_t* perm,
                 const int64_t* offsets, int64_t k, const void* codebook, float* out);

// grad_x_out (may be null; (N, d) contiguous, dtype) = G + commit_scale·(x − e_idx), where G =
// grad_quantized, or with rotation_trick the rotation trick's (‖q‖/‖x‖)·Rᵀ·grad_quantized
// (quantize_backward.cu; fastvq.reference.quantize_backward);
// grad_codebook_acc (may be null; (K, d) float64, overwritten) = Σ_{idx_i = k} (e_k − x_i) by
// float64 atomics (the caller multiplies by codebook_scale). commit_scale: float32 on the device.
void quantize_backward(int device, std::uintptr_t stream, DType dtype, Strided grad_quantized, Strided x,
                       int64_t n, int64_t d, const void* codebook, const int64_t* indices, int64_t k,
                       const float* commit_scale, bool rotation_trick, void* grad_x_out,
                       double* grad_codebook_acc);

std::string runtime_version();  // e.g. "13.0"
std::string driver_version();   // e.g. "13.0", or the error if no driver

}  // namespace fastvq::cuda
