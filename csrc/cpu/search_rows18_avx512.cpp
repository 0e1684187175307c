// AVX-512F kernel of nearest_code for a call with three packed tiles of rows (13-18 rows: a few
// streamed frames or tokens against a large codebook). Compiled with -mavx512f, called through
// simd.cpp only on AVX-512 machines.
//
// Why: with 6-row tiles, each K block of panels streams from memory for the first tile and is
// read again from L2 by the other two. Here the 18 rows take one panel at a time, so each panel
// line arrives once and feeds 18 FMAs: 18 zmm accumulators (initialised with ||e||^2), one line,
// the broadcasts. The lane-wise running best (value, index) of the 18 rows lives in L1, updated
// once per panel. Each (row, code) value is the 6-row tile's bit for bit (||e||^2, then one FMA
// per p in order) and the lanes see their codes in increasing order, so the result is the same.
#include <immintrin.h>

#include <cstdint>

#include "cpu/kernels.h"
#include "cpu/merge_lanes_simd.h"

namespace fastvq::cpu {

namespace {
constexpr int kRows = 3 * kTileRows;
}  // namespace

void search_rows18_avx512(const float* xpack, int64_t d, const float* panels, const float* norms,
                          int64_t npanels, int64_t code_base, float* best_val, int64_t* best_idx) {
  static_assert(kTileRows == 6, "the accumulators below are written for three 6-row tiles");
  alignas(64) float lane_val[kRows][kPanel];
  alignas(64) int32_t lane_idx[kRows][kPanel];
  for (int r = 0; r < kRows; ++r) {  // lanes start from the row's running best: only strictly better codes enter
    _mm512_store_ps(lane_val[r], _mm512_set1_ps(best_val[r]));
    _mm512_store_si512(lane_idx[r], _mm512_setzero_si512());
  }
  const float* a0 = xpack;  // the three packed tiles: xpack[t][p][r]
  const float* a1 = xpack + d * kTileRows;
  const float* a2 = xpack + 2 * d * kTileRows;
  __m512i id = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(kPanel);
  const int64_t ahead = 2 * d * kPanel;  // two panels on: each is its own page at d = 64 (search_tile_avx512.cpp)

  for (int64_t q = 0; q < npanels; ++q) {
    const float* b = panels + q * d * kPanel;
    __m512 c[kRows];
    const __m512 n = _mm512_load_ps(norms + q * kPanel);
    for (int r = 0; r < kRows; ++r) c[r] = n;
    for (int64_t p = 0; p < d; ++p, b += kPanel) {
      const __m512 e = _mm512_load_ps(b);
      _mm_prefetch(reinterpret_cast<const char*>(b + ahead), _MM_HINT_T0);
      const float* x0 = a0 + p * kTileRows;
      const float* x1 = a1 + p * kTileRows;
      const float* x2 = a2 + p * kTileRows;
      for (int r = 0; r < kTileRows; ++r) {
        c[r] = _mm512_fmadd_ps(_mm512_set1_ps(x0[r]), e, c[r]);
        c[kTileRows + r] = _mm512_fmadd_ps(_mm512_set1_ps(x1[r]), e, c[kTileRows + r]);
        c[2 * kTileRows + r] = _mm512_fmadd_ps(_mm512_set1_ps(x2[r]), e, c[2 * kTileRows + r]);
      }
    }
    for (int r = 0; r < kRows; ++r) {  // strict "<": ties keep the earlier code, NaN never wins
      const __m512 v = _mm512_load_ps(lane_val[r]);
      const __mmask16 better = _mm512_cmp_ps_mask(c[r], v, _CMP_LT_OQ);
      _mm512_mask_store_ps(lane_val[r], better, c[r]);
      _mm512_mask_store_epi32(lane_idx[r], better, id);
    }
    id = _mm512_add_epi32(id, step);
  }
  for (int r = 0; r < kRows; ++r)
    merge_lanes_zmm(_mm512_load_ps(lane_val[r]), _mm512_load_si512(lane_idx[r]), code_base, best_val[r], best_idx[r]);
}

}  // namespace fastvq::cpu
