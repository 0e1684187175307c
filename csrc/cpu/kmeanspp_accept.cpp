// The k-means++ block's acceptance rule (fastvq/kmeans_seeding.py: _accept): a sequential loop over a few
// hundred proposals. Each kept proposal's squared distances to the later, still undecided proposals are
// formed here from the Gram matrix (as ||a||^2 + ||b||^2 - 2 a.b, the arithmetic the numpy rule uses on
// its full pairwise matrix), so the pairwise matrix is never built (~0.2 ms a block in numpy).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/kernels.h"

namespace fastvq::cpu {

int64_t kmeanspp_accept(const double* gram, const double* norms, const int64_t* pool_rows, const double* uniform,
                        const double* old, int64_t count, int64_t block, int64_t* kept_out) {
  std::vector<double> current(old, old + count), threshold(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) threshold[i] = uniform[i] * old[i];
  int64_t kept = 0;
  for (int64_t i = 0; i < count && kept < block; ++i) {
    if (!(threshold[i] < current[i])) continue;
    kept_out[kept++] = i;
    // current only decreases, so a proposal already rejected stays rejected: only the others need it.
    for (int64_t j = i + 1; j < count; ++j) {
      if (!(threshold[j] < current[j])) continue;
      const double sqdist = pool_rows[i] == pool_rows[j] ? 0.0 : (norms[i] + norms[j]) - 2.0 * gram[i * count + j];
      current[j] = std::min(current[j], sqdist);
    }
  }
  return kept;
}

}  // namespace fastvq::cpu
