// quantize_backward: gradients of the straight-through quantizer with its two VQ losses.
//
//   grad_x[i]        = grad_quantized[i] + commit_scale * (x[i] - codebook[idx_i])      (float32)
//   grad_codebook[k] = codebook_scale * sum_{i : idx_i = k} (codebook[k] - x[i])
//
// grad_codebook reuses the counting sort of ema_stats: codes in parallel, each summing its
// rows in increasing row order in double, scaled and rounded once to float32, so the result
// is bitwise identical for any thread count. Codes with no rows get 0.
#include <algorithm>
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

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
    const CodeGroups groups = group_rows_by_code(indices, n, k);
    std::vector<double> scratch(static_cast<size_t>(nt) * d);
#pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
      double* acc = scratch.data() + static_cast<size_t>(omp_get_thread_num()) * d;
#else
      double* acc = scratch.data();
#endif
#pragma omp for schedule(dynamic, 16)
      for (int64_t c = 0; c < k; ++c) {
        const float* e = codebook + c * d;
        std::fill(acc, acc + d, 0.0);
        for (int64_t t = groups.offsets[c]; t < groups.offsets[c + 1]; ++t) {
          const float* row = x + groups.rows[t] * d;
          for (int64_t p = 0; p < d; ++p) acc[p] += static_cast<double>(e[p]) - row[p];
        }
        float* out = grad_codebook_out + c * d;
        for (int64_t p = 0; p < d; ++p) out[p] = static_cast<float>(codebook_scale * acc[p]);
      }
    }
  }
}

}  // namespace fastvq::cpu
