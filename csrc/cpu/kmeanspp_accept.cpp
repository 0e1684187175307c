// The k-means++ block's acceptance rule (fastvq/kmeans_seeding.py: _accept), a sequential loop over a few
// hundred proposals that cost ~0.5 ms a block in numpy (a Python step per proposal); here ~2 µs a block.
// The same comparisons on the same doubles, so the same proposals are kept as by the numpy loop.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/kernels.h"

namespace fastvq::cpu {

int64_t kmeanspp_accept(const double* pairwise, const double* threshold, const double* old, int64_t count,
                        int64_t block, int64_t* kept_out) {
  std::vector<double> lowered(old, old + count);
  double* current = lowered.data();
  int64_t kept = 0;
  for (int64_t i = 0; i < count && kept < block; ++i) {
    if (!(threshold[i] < current[i])) continue;
    kept_out[kept++] = i;
    const double* row = pairwise + i * count;
    for (int64_t j = 0; j < count; ++j) current[j] = std::min(current[j], row[j]);
  }
  return kept;
}

}  // namespace fastvq::cpu
