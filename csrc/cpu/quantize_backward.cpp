// quantize_backward: gradients of the straight-through quantizer with its two VQ losses.
//
//   grad_x[i]        = grad_quantized[i] + commit_scale * (x[i] - codebook[idx_i])      (float32)
//   grad_codebook[k] = codebook_scale * sum_{i : idx_i = k} (codebook[k] - x[i])
//
// grad_codebook reuses ema_stats's per-code sums (code_groups.h): codes in parallel, each
// summing its rows in increasing row order in double, scaled and rounded once to float32, so
// the result is bitwise identical for any thread count. Codes with no rows get 0.
#include <cstdint>

#include "cpu/code_groups.h"
#include "cpu/kernels.h"

namespace fastvq::cpu {

void quantize_backward(const float* grad_quantized, const float* x, int64_t n, int64_t d,
                       const float* codebook, int64_t k, const int64_t* indices,
                       float commit_scale, float codebook_scale, float* grad_x_out,
                       float* grad_codebook_out, int num_threads) {
  const int nt = resolve_threads(num_threads);

  if (grad_x_out) {
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

  if (grad_codebook_out) {
    // sum_i (e_k - x_i) = count_k * e_k - sum_i x_i, formed in double before the one rounding.
    const CodeGroups groups = group_rows_by_code(indices, n, k);
    for_each_code_sum(x, d, groups, nt, [&](int64_t c, int64_t count, const double* sums) {
      const float* e = codebook + c * d;
      float* out = grad_codebook_out + c * d;
      for (int64_t p = 0; p < d; ++p)
        out[p] = static_cast<float>(codebook_scale * (static_cast<double>(count) * e[p] - sums[p]));
    });
  }
}

}  // namespace fastvq::cpu
