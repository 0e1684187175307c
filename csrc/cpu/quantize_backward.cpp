// quantize_backward: gradients of the quantizer (straight-through or rotation trick) with its two
// VQ losses.
//
//   grad_x[i]        = G_i + commit_scale * (x[i] - codebook[idx_i])                    (float32)
//   grad_codebook[k] = codebook_scale * sum_{i : idx_i = k} (codebook[k] - x[i])
//
// G_i = g_i = grad_quantized[i] (straight-through), or with the rotation trick (Fifty et al. 2024,
// as vector-quantize-pytorch writes it; fastvq/reference.py: rotate_to), with q = codebook[idx_i]
// and vqp's safe division (eps = 1e-6):
//   n_x = max(|x|, eps), u = x / n_x, qhat = q / max(|q|, eps), a = u + qhat, w = a / max(|a|, eps),
//   s = |q| / n_x,   G_i = s * (g - 2 w (w.g) + 2 u (qhat.g))      (= s * R^T g; R is never built)
// The row math is in rotation_row.inc: double throughout, one rounding to float32 per output, and the
// same bits at every SIMD level. A null grad_quantized means g = 0, so G = 0 either way. Each row is
// computed by one thread, in order.
//
// grad_codebook reuses ema_stats's per-code sums (code_groups.h): codes in parallel, each
// summing its rows in increasing row order in double, scaled and rounded once to float32, so
// the result is bitwise identical for any thread count. Codes with no rows get 0.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/code_groups.h"
#include "cpu/kernels.h"
#include "cpu/rotation_kernels.h"

namespace fastvq::cpu {

RotationKernels rotation_kernels() {
  switch (current_simd_level()) {
#ifdef FASTVQ_HAVE_AVX512_KERNEL
    case SimdLevel::avx512: return {rotation_code_avx512, rotation_rows_avx512};
#endif
#ifdef FASTVQ_HAVE_AVX2_KERNEL
    case SimdLevel::avx2: return {rotation_code_avx2, rotation_rows_avx2};
#endif
    default: return {rotation_code_portable, rotation_rows_portable};
  }
}

std::vector<RotationCode> rotation_codes(const RotationKernels& rotation, const float* codebook, int64_t k,
                                         int64_t d, int nt) {
  std::vector<RotationCode> codes(static_cast<size_t>(k));
  // O(K d): threads only where that beats a fork and a join
#pragma omp parallel for schedule(static) num_threads(nt) if (k * d >= (int64_t{1} << 20))
  for (int64_t c = 0; c < k; ++c) codes[c] = rotation.code(codebook + c * d, d);
  return codes;
}

RotationScratch::RotationScratch(int64_t d) : buffer(static_cast<size_t>(rotation_scratch_doubles(d) + 8)) {
  aligned = buffer.data() + (8 - reinterpret_cast<uintptr_t>(buffer.data()) / 8 % 8) % 8;  // 64-byte aligned
}

void quantize_backward(const float* grad_quantized, const float* x, int64_t n, int64_t d,
                       const float* codebook, int64_t k, const int64_t* indices,
                       float commit_scale, float codebook_scale, bool rotation_trick,
                       float* grad_x_out, float* grad_codebook_out, int num_threads) {
  const int nt = resolve_threads(num_threads);

  if (grad_x_out) {
    if (grad_quantized && rotation_trick) {
      const RotationKernels rotation = rotation_kernels();
      const std::vector<RotationCode> codes = rotation_codes(rotation, codebook, k, d, nt);
#pragma omp parallel num_threads(nt)
      {
        RotationScratch scratch(d);
#pragma omp for schedule(static)
        for (int64_t begin = 0; begin < n; begin += kRotationRowsPerCall)
          rotation.rows(grad_quantized, x, codebook, indices, codes.data(), begin,
                        std::min(begin + kRotationRowsPerCall, n), d, commit_scale, scratch.aligned, grad_x_out);
      }
    } else {
#pragma omp parallel for schedule(static) num_threads(nt)
      for (int64_t i = 0; i < n; ++i) {
        const float* xi = x + i * d;
        const float* e = codebook + indices[i] * d;
        float* out = grad_x_out + i * d;
        if (grad_quantized) {
          const float* g = grad_quantized + i * d;
          for (int64_t p = 0; p < d; ++p) out[p] = g[p] + commit_scale * (xi[p] - e[p]);
        } else {
          for (int64_t p = 0; p < d; ++p) out[p] = commit_scale * (xi[p] - e[p]);
        }
      }
    }
  }

  if (grad_codebook_out) {
    // sum_i (e_k - x_i) = count_k * e_k - sum_i x_i, formed in double before the one rounding.
    const CodeGroups groups = group_rows_by_code(indices, n, k, nt);
    for_each_code_sum(x, d, groups, nt, [&](int64_t c, int64_t count, const double* sums) {
      const float* e = codebook + c * d;
      float* out = grad_codebook_out + c * d;
      for (int64_t p = 0; p < d; ++p)
        out[p] = static_cast<float>(codebook_scale * (static_cast<double>(count) * e[p] - sums[p]));
    });
  }
}

}  // namespace fastvq::cpu
