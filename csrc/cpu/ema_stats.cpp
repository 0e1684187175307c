// ema_stats: counts_k = #{i : idx_i = k}, sums_k = sum_{idx_i = k} x_i, deterministic.
//
// Rows are grouped by code with a stable counting sort (parallel over row slices); then codes are
// processed in parallel, each summing its rows in increasing row order in double and rounding once to
// float32. The result does not depend on the thread count (or the schedule).
#include <cstdint>

#include "cpu/code_groups.h"
#include "cpu/kernels.h"

namespace fastvq::cpu {

void ema_stats(const float* x, int64_t n, int64_t d, const int64_t* indices, int64_t k,
               float* counts_out, float* sums_out, int num_threads) {
  const int nt = resolve_threads(num_threads);
  const CodeGroups groups = group_rows_by_code(indices, n, k, nt);
  for_each_code_sum(x, d, groups, nt, [&](int64_t c, int64_t count, const double* sums) {
    counts_out[c] = static_cast<float>(count);
    float* out = sums_out + c * d;
    for (int64_t p = 0; p < d; ++p) out[p] = static_cast<float>(sums[p]);
  });
}

}  // namespace fastvq::cpu
