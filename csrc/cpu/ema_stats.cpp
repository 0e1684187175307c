// ema_stats: counts_k = #{i : idx_i = k}, sums_k = sum_{idx_i = k} x_i, deterministic.
//
// Rows are grouped by code with a serial stable counting sort; then codes are processed in
// parallel, each summing its rows in increasing row order in double and rounding once to
// float32. The result does not depend on the thread count (or the schedule).
#include <algorithm>
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/code_groups.h"
#include "cpu/kernels.h"

namespace fastvq::cpu {

void ema_stats(const float* x, int64_t n, int64_t d, const int64_t* indices, int64_t k,
               float* counts_out, float* sums_out, int num_threads) {
  const int nt = resolve_threads(num_threads);
  const CodeGroups groups = group_rows_by_code(indices, n, k);
  std::vector<double> scratch(static_cast<size_t>(nt) * d);

  // dynamic balances skewed code usage; each code's result is independent of who computes it.
#pragma omp parallel num_threads(nt)
  {
#ifdef _OPENMP
    double* acc = scratch.data() + static_cast<size_t>(omp_get_thread_num()) * d;
#else
    double* acc = scratch.data();
#endif
#pragma omp for schedule(dynamic, 16)
    for (int64_t c = 0; c < k; ++c) {
      counts_out[c] = static_cast<float>(groups.count(c));
      std::fill(acc, acc + d, 0.0);
      for (int64_t t = groups.offsets[c]; t < groups.offsets[c + 1]; ++t) {
        const float* row = x + groups.rows[t] * d;
        for (int64_t p = 0; p < d; ++p) acc[p] += row[p];
      }
      float* out = sums_out + c * d;
      for (int64_t p = 0; p < d; ++p) out[p] = static_cast<float>(acc[p]);
    }
  }
}

}  // namespace fastvq::cpu
