// Rows grouped by code: a stable counting sort shared by ema_stats and quantize_backward.
//
// rows[offsets[k] .. offsets[k+1]) are the rows i with indices[i] == k, in increasing i.
// Per-code reductions then walk their rows in that fixed order, so their results are
// bitwise identical for any number of threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fastvq::cpu {

struct CodeGroups {
  std::vector<int64_t> offsets;  // K + 1 entries
  std::vector<int64_t> rows;     // N entries

  int64_t count(int64_t code) const { return offsets[code + 1] - offsets[code]; }
};

// Serial O(N + K). `indices` must already be validated to lie in [0, k).
CodeGroups group_rows_by_code(const int64_t* indices, int64_t n, int64_t k);

}  // namespace fastvq::cpu
