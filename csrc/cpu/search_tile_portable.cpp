// Portable micro-kernel of nearest_code: same packing, same code order and the same
// tie/NaN rules as the AVX2 kernel, in plain C++ compiled for the baseline ISA (the
// compiler may auto-vectorise it with SSE2). Rounding differs from the AVX2 path only in
// that it uses separate multiply and add instead of FMA.
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/kernels.h"

namespace fastvq::cpu {
namespace {

// Two rows at a time keeps the 2 x 16 accumulators in the 16 xmm registers of SSE2.
constexpr int kRowsPerPass = 2;
static_assert(kTileRows % kRowsPerPass == 0, "passes must cover the tile");

// Rows r0, r0+1 of the packed tile (xpack[p * kTileRows + r]).
void search_rows(const float* xpack, int r0, int64_t d, const float* panels, const float* norms,
                 int64_t npanels, int64_t code_base, float* best_val, int64_t* best_idx) {
  constexpr int R = kRowsPerPass;
  float lane_val[R][kPanel];
  int32_t lane_idx[R][kPanel];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kPanel; ++j) {
      lane_val[r][j] = std::numeric_limits<float>::infinity();
      lane_idx[r][j] = 0;
    }

  for (int64_t q = 0; q < npanels; ++q) {
    const float* b = panels + q * d * kPanel;
    float acc[R][kPanel];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < kPanel; ++j) acc[r][j] = norms[q * kPanel + j];
    for (int64_t p = 0; p < d; ++p) {
      const float* bp = b + p * kPanel;
      for (int r = 0; r < R; ++r) {
        const float a = xpack[p * kTileRows + r0 + r];
        for (int j = 0; j < kPanel; ++j) acc[r][j] += a * bp[j];
      }
    }
    // Strict "<": NaN compares false and never wins; on ties the earlier code stays.
    const int32_t base = static_cast<int32_t>(q * kPanel);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < kPanel; ++j)
        if (acc[r][j] < lane_val[r][j]) {
          lane_val[r][j] = acc[r][j];
          lane_idx[r][j] = base + j;
        }
  }

  merge_lanes(lane_val, lane_idx, R, code_base, best_val + r0, best_idx + r0);
}

}  // namespace

void merge_lanes(const float (*lane_val)[kPanel], const int32_t (*lane_idx)[kPanel], int rows,
                 int64_t code_base, float* best_val, int64_t* best_idx) {
  for (int r = 0; r < rows; ++r) {
    float v = lane_val[r][0];
    int32_t i = lane_idx[r][0];
    for (int j = 1; j < kPanel; ++j)
      if (lane_val[r][j] < v || (lane_val[r][j] == v && lane_idx[r][j] < i)) {
        v = lane_val[r][j];
        i = lane_idx[r][j];
      }
    if (v < best_val[r]) {
      best_val[r] = v;
      best_idx[r] = code_base + i;
    }
  }
}

void search_tile_portable(const float* xpack, int64_t d, const float* panels, const float* norms,
                          int64_t npanels, int64_t code_base, float* best_val, int64_t* best_idx) {
  for (int r = 0; r < kTileRows; r += kRowsPerPass)
    search_rows(xpack, r, d, panels, norms, npanels, code_base, best_val, best_idx);
}

}  // namespace fastvq::cpu

// ---- the top-k variant (kernels.h) ----
namespace fastvq::cpu {
namespace {

// Insert the lanes of `mask` (bit j: lane j, code first_code + j) of one row's 16 values into
// that row's list, in lane order.
void topk_insert_lanes(const float* values, uint32_t mask, int64_t first_code, int k, float* list_val,
                       int32_t* list_idx) {
  while (mask) {
#if defined(__GNUC__) || defined(__clang__)
    const int j = __builtin_ctz(mask);
#else
    int j = 0;
    while (!(mask >> j & 1u)) ++j;
#endif
    mask &= mask - 1;  // lanes in increasing order: codes in increasing index order
    const float v = values[j];
    if (!(v < list_val[k - 1])) continue;  // the k-th may have dropped since the mask was made
    // Entries with an equal value came earlier, with lower indices: the new code goes after them.
    // Counted without branches (a fixed trip count), then the tail moves one place.
    int pos = 0;
    for (int i = 0; i < k - 1; ++i) pos += list_val[i] <= v;
    std::memmove(list_val + pos + 1, list_val + pos, sizeof(float) * static_cast<size_t>(k - 1 - pos));
    std::memmove(list_idx + pos + 1, list_idx + pos, sizeof(int32_t) * static_cast<size_t>(k - 1 - pos));
    list_val[pos] = v;
    list_idx[pos] = static_cast<int32_t>(first_code + j);
  }
}

// Rows r0, r0+1 of the tile, with the arithmetic of search_rows above (same values).
void search_rows_topk(const float* xpack, int r0, int64_t d, const float* panels, const float* norms,
                      int64_t npanels, int64_t code_base, int k, float* list_val, int32_t* list_idx) {
  constexpr int R = kRowsPerPass;
  for (int64_t q = 0; q < npanels; ++q) {
    const float* b = panels + q * d * kPanel;
    float acc[R][kPanel];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < kPanel; ++j) acc[r][j] = norms[q * kPanel + j];
    for (int64_t p = 0; p < d; ++p) {
      const float* bp = b + p * kPanel;
      for (int r = 0; r < R; ++r) {
        const float a = xpack[p * kTileRows + r0 + r];
        for (int j = 0; j < kPanel; ++j) acc[r][j] += a * bp[j];
      }
    }
    for (int r = 0; r < R; ++r) {
      float* lv = list_val + (r0 + r) * k;
      const float threshold = lv[k - 1];
      uint32_t mask = 0;
      for (int j = 0; j < kPanel; ++j) mask |= static_cast<uint32_t>(acc[r][j] < threshold) << j;
      if (mask) topk_insert_lanes(acc[r], mask, code_base + q * kPanel, k, lv, list_idx + (r0 + r) * k);
    }
  }
}

}  // namespace

void search_tile_topk_portable(const float* xpack, int64_t d, const float* panels, const float* norms,
                               int64_t npanels, int64_t code_base, int k, float* list_val, int32_t* list_idx) {
  for (int r = 0; r < kTileRows; r += kRowsPerPass)
    search_rows_topk(xpack, r, d, panels, norms, npanels, code_base, k, list_val, list_idx);
}

}  // namespace fastvq::cpu
