// ema_stats: counts_k = #{i : idx_i = k}, sums_k = sum_{idx_i = k} x_i, deterministic.
//
// Each code's rows are summed in increasing row order in double and rounded once to float32, by one
// thread (code_groups.h: streamed by code ranges, or grouped by a sort for many codes). The result
// does not depend on the thread count (or the schedule).
#include <cstdint>

#include "cpu/code_groups.h"
#include "cpu/kernels.h"

namespace fastvq::cpu {

void ema_stats(const float* x, int64_t n, int64_t d, const int64_t* indices, int64_t k,
               float* counts_out, float* sums_out, int num_threads) {
  const int nt = resolve_threads(num_threads);
  for_each_code_sum(x, n, d, indices, k, nt, [&](int64_t c, int64_t count, const double* sums) {
    counts_out[c] = static_cast<float>(count);
    float* out = sums_out + c * d;
    for (int64_t p = 0; p < d; ++p) out[p] = static_cast<float>(sums[p]);
  });
}

}  // namespace fastvq::cpu
