// AVX2 + FMA micro-kernel of nearest_code. The only file compiled with -mavx2 -mfma; it is
// called through simd.cpp only after __builtin_cpu_supports("avx2") && ("fma").
//
// Deliberately free of the C++ standard library (see kernels.h): intrinsics and raw loops.
//
// Register blocking: a tile of 6 rows against one panel of 16 codes keeps 12 ymm
// accumulators, initialised with the panel's ||e||^2, so after d FMAs each holds
// ||e||^2 - 2 x.e with no epilogue arithmetic. Per p: 2 aligned loads of the panel,
// 6 broadcasts of the packed x tile, 12 FMAs (15 of the 16 ymm registers live).
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "cpu/kernels.h"
#include "cpu/merge_lanes_simd.h"

namespace fastvq::cpu {
namespace {

constexpr int R = kTileRows;
static_assert(R == 6, "the register blocking below is written for 6 rows");

#ifndef FASTVQ_WARM_PANELS
#define FASTVQ_WARM_PANELS 32
#endif

// Lane-wise running best of one tile: lane j of half h of row r holds the best (value,
// index) among the codes q*16 + 8*h + j it has seen, or the row's best when the lanes were
// (re)started from it. Index = code offset within the call.
struct Lanes {
  alignas(32) float val[R][kPanel];
  alignas(32) int32_t idx[R][kPanel];

  // Every lane := the row's running best (its index is irrelevant: only strictly smaller
  // values replace it, and the merge below is strict too).
  void start_from(const float* best_val) {
    for (int r = 0; r < R; ++r) {
      const __m256 v = _mm256_set1_ps(best_val[r]);
      _mm256_store_ps(val[r], v);
      _mm256_store_ps(val[r] + 8, v);
      _mm256_store_si256(reinterpret_cast<__m256i*>(idx[r]), _mm256_setzero_si256());
      _mm256_store_si256(reinterpret_cast<__m256i*>(idx[r] + 8), _mm256_setzero_si256());
    }
  }

  // Cross-lane reduction merged strictly into the row's running best, whose codes all come
  // before this call's (kernels.h: merge_lanes).
  void merge_into(int64_t code_base, float* best_val, int64_t* best_idx) const {
    for (int r = 0; r < R; ++r)
      merge_lanes_ymm(_mm256_load_ps(val[r]), _mm256_load_ps(val[r] + 8),
                      _mm256_load_si256(reinterpret_cast<const __m256i*>(idx[r])),
                      _mm256_load_si256(reinterpret_cast<const __m256i*>(idx[r] + 8)), code_base, best_val[r],
                      best_idx[r]);
  }
};

// Panels [q_begin, q_end) of the call. SKIP: first test whether any lane improves and skip
// the updates if none does -- the common case once the lanes hold a good candidate.
template <bool SKIP>
__attribute__((always_inline)) inline void run_panels(Lanes& lanes, const float* xpack, int64_t d,
                                                      const float* panels, const float* norms,
                                                      int64_t q_begin, int64_t q_end) {
  __m256i idx0 = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int32_t>(q_begin * kPanel)));
  __m256i idx1 = _mm256_add_epi32(idx0, _mm256_set1_epi32(8));
  const __m256i step = _mm256_set1_epi32(kPanel);

  for (int64_t q = q_begin; q < q_end; ++q) {
    const float* b = panels + q * d * kPanel;
    const float* a = xpack;
    __m256 c00 = _mm256_load_ps(norms + q * kPanel), c01 = _mm256_load_ps(norms + q * kPanel + 8);
    __m256 c10 = c00, c11 = c01, c20 = c00, c21 = c01, c30 = c00, c31 = c01, c40 = c00,
           c41 = c01, c50 = c00, c51 = c01;
    for (int64_t p = 0; p < d; ++p, a += R, b += kPanel) {
      const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
      _mm_prefetch(reinterpret_cast<const char*>(b + d * kPanel), _MM_HINT_T0);  // search_tile_avx512.cpp: ahead
      __m256 x;
      x = _mm256_broadcast_ss(a + 0); c00 = _mm256_fmadd_ps(x, b0, c00); c01 = _mm256_fmadd_ps(x, b1, c01);
      x = _mm256_broadcast_ss(a + 1); c10 = _mm256_fmadd_ps(x, b0, c10); c11 = _mm256_fmadd_ps(x, b1, c11);
      x = _mm256_broadcast_ss(a + 2); c20 = _mm256_fmadd_ps(x, b0, c20); c21 = _mm256_fmadd_ps(x, b1, c21);
      x = _mm256_broadcast_ss(a + 3); c30 = _mm256_fmadd_ps(x, b0, c30); c31 = _mm256_fmadd_ps(x, b1, c31);
      x = _mm256_broadcast_ss(a + 4); c40 = _mm256_fmadd_ps(x, b0, c40); c41 = _mm256_fmadd_ps(x, b1, c41);
      x = _mm256_broadcast_ss(a + 5); c50 = _mm256_fmadd_ps(x, b0, c50); c51 = _mm256_fmadd_ps(x, b1, c51);
    }

    // Strict "<" (ordered: NaN compares false and never wins); min_ps(c, v) returns v
    // unless c < v, which is the same selection.
    bool update = true;
    if (SKIP) {
      __m256 any = _mm256_cmp_ps(c00, _mm256_load_ps(lanes.val[0]), _CMP_LT_OQ);
      any = _mm256_or_ps(any, _mm256_cmp_ps(c01, _mm256_load_ps(lanes.val[0] + 8), _CMP_LT_OQ));
      any = _mm256_or_ps(any, _mm256_cmp_ps(c10, _mm256_load_ps(lanes.val[1]), _CMP_LT_OQ));
      any = _mm256_or_ps(any, _mm256_cmp_ps(c11, _mm256_load_ps(lanes.val[1] + 8), _CMP_LT_OQ));
      any = _mm256_or_ps(any, _mm256_cmp_ps(c20, _mm256_load_ps(lanes.val[2]), _CMP_LT_OQ));
      any = _mm256_or_ps(any, _mm256_cmp_ps(c21, _mm256_load_ps(lanes.val[2] + 8), _CMP_LT_OQ));
      any = _mm256_or_ps(any, _mm256_cmp_ps(c30, _mm256_load_ps(lanes.val[3]), _CMP_LT_OQ));
      any = _mm256_or_ps(any, _mm256_cmp_ps(c31, _mm256_load_ps(lanes.val[3] + 8), _CMP_LT_OQ));
      any = _mm256_or_ps(any, _mm256_cmp_ps(c40, _mm256_load_ps(lanes.val[4]), _CMP_LT_OQ));
      any = _mm256_or_ps(any, _mm256_cmp_ps(c41, _mm256_load_ps(lanes.val[4] + 8), _CMP_LT_OQ));
      any = _mm256_or_ps(any, _mm256_cmp_ps(c50, _mm256_load_ps(lanes.val[5]), _CMP_LT_OQ));
      any = _mm256_or_ps(any, _mm256_cmp_ps(c51, _mm256_load_ps(lanes.val[5] + 8), _CMP_LT_OQ));
      update = !_mm256_testz_ps(any, any);
    }
    if (update) {
      const __m256 id0 = _mm256_castsi256_ps(idx0), id1 = _mm256_castsi256_ps(idx1);
      auto lane_update = [&](int r, int h, __m256 c, __m256 id) {
        float* vp = lanes.val[r] + 8 * h;
        float* ip = reinterpret_cast<float*>(lanes.idx[r] + 8 * h);
        const __m256 v = _mm256_load_ps(vp);
        const __m256 m = _mm256_cmp_ps(c, v, _CMP_LT_OQ);
        _mm256_store_ps(vp, _mm256_min_ps(c, v));
        _mm256_store_ps(ip, _mm256_blendv_ps(_mm256_load_ps(ip), id, m));
      };
      lane_update(0, 0, c00, id0); lane_update(0, 1, c01, id1);
      lane_update(1, 0, c10, id0); lane_update(1, 1, c11, id1);
      lane_update(2, 0, c20, id0); lane_update(2, 1, c21, id1);
      lane_update(3, 0, c30, id0); lane_update(3, 1, c31, id1);
      lane_update(4, 0, c40, id0); lane_update(4, 1, c41, id1);
      lane_update(5, 0, c50, id0); lane_update(5, 1, c51, id1);
    }
    idx0 = _mm256_add_epi32(idx0, step);
    idx1 = _mm256_add_epi32(idx1, step);
    // Keep the lanes in memory: otherwise GCC splits them into registers and spills them
    // to two places, doubling the epilogue's stores.
    __asm__ volatile("" : : "r"(&lanes) : "memory");
  }
}

}  // namespace

void search_tile_avx2(const float* xpack, int64_t d, const float* panels, const float* norms,
                      int64_t npanels, int64_t code_base, float* best_val, int64_t* best_idx) {
  Lanes lanes;
  lanes.start_from(best_val);
  // A row that has no candidate yet improves on almost every panel: update unconditionally
  // for a few panels, fold the lanes into the row's best, restart the lanes from it, and
  // from then on test before updating.
  int64_t warm = 0;
  for (int r = 0; r < R; ++r)
    if (!(best_val[r] < __builtin_inff())) warm = FASTVQ_WARM_PANELS;
  warm = warm < npanels ? warm : npanels;
  if (warm > 0) {
    run_panels<false>(lanes, xpack, d, panels, norms, 0, warm);
    lanes.merge_into(code_base, best_val, best_idx);
    lanes.start_from(best_val);
  }
  run_panels<true>(lanes, xpack, d, panels, norms, warm, npanels);
  lanes.merge_into(code_base, best_val, best_idx);
}

}  // namespace fastvq::cpu

// ---- a tile with fewer rows (kernels.h: SearchFewRowsFn) ----
namespace fastvq::cpu {
namespace {

// RR rows against PP panels at a time (two ymm halves per panel), as search_few_rows_avx512: each
// (row, code) value is the full tile's (||e||^2, then one FMA per p in order), and each of the 16
// lanes sees its codes in increasing order.
template <int RR, int PP>
void few_rows(const float* xpack, int64_t d, const float* panels, const float* norms, int64_t npanels,
              int64_t code_base, float* best_val, int64_t* best_idx) {
  __m256 v[RR][2];
  __m256 ix[RR][2];  // int32 lanes, blended as floats
  for (int r = 0; r < RR; ++r)
    for (int h = 0; h < 2; ++h) {
      v[r][h] = _mm256_set1_ps(best_val[r]);
      ix[r][h] = _mm256_setzero_ps();
    }
  __m256i id0 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step = _mm256_set1_epi32(kPanel), half = _mm256_set1_epi32(8);
  int64_t q = 0;
  auto block = [&](auto panels_now) {
    constexpr int P = decltype(panels_now)::value;
    __m256 c[RR][P][2];
    for (int j = 0; j < P; ++j) {
      const __m256 n0 = _mm256_load_ps(norms + (q + j) * kPanel), n1 = _mm256_load_ps(norms + (q + j) * kPanel + 8);
      for (int r = 0; r < RR; ++r) {
        c[r][j][0] = n0;
        c[r][j][1] = n1;
      }
    }
    const float* a = xpack;
    const float* b = panels + q * d * kPanel;
    for (int64_t p = 0; p < d; ++p, a += R, b += kPanel) {
      __m256 e[P][2];
      for (int j = 0; j < P; ++j) {
        e[j][0] = _mm256_load_ps(b + j * d * kPanel);
        e[j][1] = _mm256_load_ps(b + j * d * kPanel + 8);
      }
      for (int r = 0; r < RR; ++r) {
        const __m256 x = _mm256_broadcast_ss(a + r);
        for (int j = 0; j < P; ++j) {
          c[r][j][0] = _mm256_fmadd_ps(x, e[j][0], c[r][j][0]);
          c[r][j][1] = _mm256_fmadd_ps(x, e[j][1], c[r][j][1]);
        }
      }
    }
    for (int j = 0; j < P; ++j) {
      const __m256 id[2] = {_mm256_castsi256_ps(id0), _mm256_castsi256_ps(_mm256_add_epi32(id0, half))};
      for (int r = 0; r < RR; ++r)
        for (int h = 0; h < 2; ++h) {
          const __m256 m = _mm256_cmp_ps(c[r][j][h], v[r][h], _CMP_LT_OQ);
          v[r][h] = _mm256_min_ps(c[r][j][h], v[r][h]);  // v unless c < v: the same selection
          ix[r][h] = _mm256_blendv_ps(ix[r][h], id[h], m);
        }
      id0 = _mm256_add_epi32(id0, step);
    }
    q += P;
  };
  while (q + PP <= npanels) block(std::integral_constant<int, PP>{});
  while (q < npanels) block(std::integral_constant<int, 1>{});
  for (int r = 0; r < RR; ++r)
    merge_lanes_ymm(v[r][0], v[r][1], _mm256_castps_si256(ix[r][0]), _mm256_castps_si256(ix[r][1]), code_base,
                    best_val[r], best_idx[r]);
}

}  // namespace

void search_few_rows_avx2(int rows, const float* xpack, int64_t d, const float* panels, const float* norms,
                          int64_t npanels, int64_t code_base, float* best_val, int64_t* best_idx) {
  switch (rows) {
    case 1: few_rows<1, 4>(xpack, d, panels, norms, npanels, code_base, best_val, best_idx); break;
    case 2: few_rows<2, 2>(xpack, d, panels, norms, npanels, code_base, best_val, best_idx); break;
    case 3: few_rows<3, 1>(xpack, d, panels, norms, npanels, code_base, best_val, best_idx); break;
    case 4: few_rows<4, 1>(xpack, d, panels, norms, npanels, code_base, best_val, best_idx); break;
    default: few_rows<5, 1>(xpack, d, panels, norms, npanels, code_base, best_val, best_idx); break;
  }
}

}  // namespace fastvq::cpu

// ---- the top-k variant (kernels.h): the same accumulation as run_panels, a top-k epilogue ----
namespace fastvq::cpu {
namespace {

// One row's list in C ymm chunks (lane j of chunk c: entry 8c + j), as in search_tile_avx512.cpp:
// lanes k and up start at +inf, are shifted like the others and never stored back.
template <int C>
struct RowList {
  __m256 v[C];
  __m256 i[C];  // int32 codes, blended as floats
};

__attribute__((always_inline)) inline __m256i lanes_below(int k, int c) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k - 8 * c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Insert (vb, ib), both broadcast, after every entry <= vb: entry j keeps its pair where it is
// <= vb, takes the new one where only entry j - 1 is, and entry j - 1's pair otherwise.
template <int C>
__attribute__((always_inline)) inline void insert(RowList<C>& l, __m256 vb, __m256 ib) {
  const __m256i back = _mm256_setr_epi32(7, 0, 1, 2, 3, 4, 5, 6);
  __m256 rv[C], ri[C];
  for (int c = 0; c < C; ++c) {
    rv[c] = _mm256_permutevar8x32_ps(l.v[c], back);
    ri[c] = _mm256_permutevar8x32_ps(l.i[c], back);
  }
  for (int c = 0; c < C; ++c) {  // lane 0 from chunk c - 1's lane 7 (-inf before the first)
    const __m256 sv = _mm256_blend_ps(rv[c], c > 0 ? rv[c - 1] : _mm256_set1_ps(-__builtin_inff()), 1);
    const __m256 si = _mm256_blend_ps(ri[c], c > 0 ? ri[c - 1] : ri[0], 1);  // chunk 0's lane 0: never taken
    const __m256 stay = _mm256_cmp_ps(l.v[c], vb, _CMP_LE_OQ);
    const __m256 after = _mm256_cmp_ps(sv, vb, _CMP_LE_OQ);
    l.v[c] = _mm256_blendv_ps(_mm256_blendv_ps(sv, vb, after), l.v[c], stay);
    l.i[c] = _mm256_blendv_ps(_mm256_blendv_ps(si, ib, after), l.i[c], stay);
  }
}

// The lanes of `mask` (bit j: score values[j] of code first + j) into one row's list, in code order.
template <int C>
__attribute__((noinline)) void insert_lanes(const float* values, uint32_t mask, int64_t first, int k,
                                            float* list_val, int32_t* list_idx) {
  RowList<C> l;
  for (int c = 0; c < C; ++c) {
    const __m256i m = lanes_below(k, c);
    l.v[c] = _mm256_blendv_ps(_mm256_set1_ps(__builtin_inff()), _mm256_maskload_ps(list_val + 8 * c, m),
                              _mm256_castsi256_ps(m));
    l.i[c] = _mm256_castsi256_ps(_mm256_maskload_epi32(list_idx + 8 * c, m));
  }
  while (mask) {
    const int j = __builtin_ctz(mask);
    mask &= mask - 1;
    insert<C>(l, _mm256_set1_ps(values[j]), _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int32_t>(first + j))));
  }
  for (int c = 0; c < C; ++c) {
    const __m256i m = lanes_below(k, c);
    _mm256_maskstore_ps(list_val + 8 * c, m, l.v[c]);
    _mm256_maskstore_epi32(list_idx + 8 * c, m, _mm256_castps_si256(l.i[c]));
  }
}

template <int C>
void tile_topk(const float* xpack, int64_t d, const float* panels, const float* norms, int64_t npanels,
               int64_t code_base, int k, float* list_val, int32_t* list_idx) {
  alignas(32) float buf[R][kPanel];
  // The lanes of row r's (lo, hi) strictly below its k-th value, as a mask (bit j: code 16q + j).
  auto passing = [&](int r, __m256 lo, __m256 hi) {
    const __m256 threshold = _mm256_set1_ps(list_val[r * k + k - 1]);
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(lo, threshold, _CMP_LT_OQ))) |
           static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(hi, threshold, _CMP_LT_OQ))) << 8;
  };
  for (int64_t q = 0; q < npanels; ++q) {
    const float* b = panels + q * d * kPanel;
    const float* a = xpack;
    __m256 c00 = _mm256_load_ps(norms + q * kPanel), c01 = _mm256_load_ps(norms + q * kPanel + 8);
    __m256 c10 = c00, c11 = c01, c20 = c00, c21 = c01, c30 = c00, c31 = c01, c40 = c00,
           c41 = c01, c50 = c00, c51 = c01;
    for (int64_t p = 0; p < d; ++p, a += R, b += kPanel) {
      const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
      _mm_prefetch(reinterpret_cast<const char*>(b + d * kPanel), _MM_HINT_T0);  // search_tile_avx512.cpp: ahead
      __m256 x;
      x = _mm256_broadcast_ss(a + 0); c00 = _mm256_fmadd_ps(x, b0, c00); c01 = _mm256_fmadd_ps(x, b1, c01);
      x = _mm256_broadcast_ss(a + 1); c10 = _mm256_fmadd_ps(x, b0, c10); c11 = _mm256_fmadd_ps(x, b1, c11);
      x = _mm256_broadcast_ss(a + 2); c20 = _mm256_fmadd_ps(x, b0, c20); c21 = _mm256_fmadd_ps(x, b1, c21);
      x = _mm256_broadcast_ss(a + 3); c30 = _mm256_fmadd_ps(x, b0, c30); c31 = _mm256_fmadd_ps(x, b1, c31);
      x = _mm256_broadcast_ss(a + 4); c40 = _mm256_fmadd_ps(x, b0, c40); c41 = _mm256_fmadd_ps(x, b1, c41);
      x = _mm256_broadcast_ss(a + 5); c50 = _mm256_fmadd_ps(x, b0, c50); c51 = _mm256_fmadd_ps(x, b1, c51);
    }
    // One branch per panel in the common case (no lane passes); the winners go in row by row.
    const uint32_t m[R] = {passing(0, c00, c01), passing(1, c10, c11), passing(2, c20, c21),
                           passing(3, c30, c31), passing(4, c40, c41), passing(5, c50, c51)};
    if (!(m[0] | m[1] | m[2] | m[3] | m[4] | m[5])) continue;
    const __m256 c[R][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    for (int r = 0; r < R; ++r) {
      _mm256_store_ps(buf[r], c[r][0]);
      _mm256_store_ps(buf[r] + 8, c[r][1]);
    }
    for (int r = 0; r < R; ++r)
      if (m[r]) insert_lanes<C>(buf[r], m[r], code_base + q * kPanel, k, list_val + r * k, list_idx + r * k);
  }
}

}  // namespace

void search_tile_topk_avx2(const float* xpack, int64_t d, const float* panels, const float* norms,
                           int64_t npanels, int64_t code_base, int k, float* list_val, int32_t* list_idx) {
  switch ((k + 7) / 8) {  // k <= 64: up to 8 chunks (more than 2 spill, still without branches)
    case 1: tile_topk<1>(xpack, d, panels, norms, npanels, code_base, k, list_val, list_idx); break;
    case 2: tile_topk<2>(xpack, d, panels, norms, npanels, code_base, k, list_val, list_idx); break;
    case 3: case 4: tile_topk<4>(xpack, d, panels, norms, npanels, code_base, k, list_val, list_idx); break;
    default: tile_topk<8>(xpack, d, panels, norms, npanels, code_base, k, list_val, list_idx); break;
  }
}

}  // namespace fastvq::cpu
