// Stable counting sort of rows by code (see code_groups.h).
#include "cpu/code_groups.h"

namespace fastvq::cpu {

CodeGroups group_rows_by_code(const int64_t* indices, int64_t n, int64_t k) {
  CodeGroups g;
  g.offsets.assign(static_cast<size_t>(k + 1), 0);
  g.rows.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) ++g.offsets[indices[i] + 1];
  for (int64_t c = 0; c < k; ++c) g.offsets[c + 1] += g.offsets[c];
  std::vector<int64_t> next(g.offsets.begin(), g.offsets.end() - 1);
  for (int64_t i = 0; i < n; ++i) g.rows[next[indices[i]]++] = i;
  return g;
}

}  // namespace fastvq::cpu
