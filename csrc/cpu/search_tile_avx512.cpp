// AVX-512F micro-kernel of nearest_code. The only file compiled with -mavx512f; called through
// simd.cpp only after __builtin_cpu_supports("avx512f") (which also checks that the OS saves
// the zmm state). An optional extra: CI machines are AVX2-only, search_tile_avx2.cpp is the
// path that must be fast everywhere.
//
// Deliberately free of the C++ standard library (see kernels.h): intrinsics and raw loops.
//
// Same packing as every level (panels of 16 codes = one zmm). Register blocking: the 6-row
// packed tile against two consecutive panels, 12 zmm accumulators initialised with ||e||^2;
// per p: 2 loads, 6 broadcasts, 12 FMAs. The lane-wise running best of the 6 rows (value and
// index, 12 zmm) stays in registers: 32 zmm registers leave room for it, and the masked
// compare + 2 masked moves epilogue is 3 cheap instructions per accumulator.
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "cpu/kernels.h"

namespace fastvq::cpu {
namespace {

constexpr int R = kTileRows;
static_assert(R == 6, "the register blocking below is written for 6 rows");

// Lane j of row r holds the best (value, index) among the codes q*16 + j seen so far, codes
// in increasing order, strict "<" so ties keep the earlier code and NaN never wins (ordered
// compare, then masked moves of value and index).
#define FASTVQ_UPDATE(c, r, id)                                   \
  do {                                                            \
    const __mmask16 m_ = _mm512_cmp_ps_mask(c, v##r, _CMP_LT_OQ); \
    v##r = _mm512_mask_mov_ps(v##r, m_, c);                       \
    i##r = _mm512_mask_mov_epi32(i##r, m_, id);                   \
  } while (0)

}  // namespace

void search_tile_avx512(const float* xpack, int64_t d, const float* panels, const float* norms,
                        int64_t npanels, int64_t code_base, float* best_val, int64_t* best_idx) {
  // Lanes start from the row's running best: only strictly better codes are recorded.
  __m512 v0 = _mm512_set1_ps(best_val[0]), v1 = _mm512_set1_ps(best_val[1]),
         v2 = _mm512_set1_ps(best_val[2]), v3 = _mm512_set1_ps(best_val[3]),
         v4 = _mm512_set1_ps(best_val[4]), v5 = _mm512_set1_ps(best_val[5]);
  __m512i i0 = _mm512_setzero_si512(), i1 = i0, i2 = i0, i3 = i0, i4 = i0, i5 = i0;
  __m512i id = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(kPanel);

  int64_t q = 0;
  for (; q + 2 <= npanels; q += 2) {
    const float* b = panels + q * d * kPanel;
    const float* b2 = b + d * kPanel;
    const float* a = xpack;
    __m512 c00 = _mm512_load_ps(norms + q * kPanel), c01 = _mm512_load_ps(norms + (q + 1) * kPanel);
    __m512 c10 = c00, c11 = c01, c20 = c00, c21 = c01, c30 = c00, c31 = c01, c40 = c00,
           c41 = c01, c50 = c00, c51 = c01;
    for (int64_t p = 0; p < d; ++p, a += R, b += kPanel, b2 += kPanel) {
      const __m512 e0 = _mm512_load_ps(b), e1 = _mm512_load_ps(b2);
      __m512 x;
      x = _mm512_set1_ps(a[0]); c00 = _mm512_fmadd_ps(x, e0, c00); c01 = _mm512_fmadd_ps(x, e1, c01);
      x = _mm512_set1_ps(a[1]); c10 = _mm512_fmadd_ps(x, e0, c10); c11 = _mm512_fmadd_ps(x, e1, c11);
      x = _mm512_set1_ps(a[2]); c20 = _mm512_fmadd_ps(x, e0, c20); c21 = _mm512_fmadd_ps(x, e1, c21);
      x = _mm512_set1_ps(a[3]); c30 = _mm512_fmadd_ps(x, e0, c30); c31 = _mm512_fmadd_ps(x, e1, c31);
      x = _mm512_set1_ps(a[4]); c40 = _mm512_fmadd_ps(x, e0, c40); c41 = _mm512_fmadd_ps(x, e1, c41);
      x = _mm512_set1_ps(a[5]); c50 = _mm512_fmadd_ps(x, e0, c50); c51 = _mm512_fmadd_ps(x, e1, c51);
    }
    // panel q before panel q + 1: codes reach each lane in increasing order
    const __m512i id1 = _mm512_add_epi32(id, step);
    FASTVQ_UPDATE(c00, 0, id); FASTVQ_UPDATE(c01, 0, id1);
    FASTVQ_UPDATE(c10, 1, id); FASTVQ_UPDATE(c11, 1, id1);
    FASTVQ_UPDATE(c20, 2, id); FASTVQ_UPDATE(c21, 2, id1);
    FASTVQ_UPDATE(c30, 3, id); FASTVQ_UPDATE(c31, 3, id1);
    FASTVQ_UPDATE(c40, 4, id); FASTVQ_UPDATE(c41, 4, id1);
    FASTVQ_UPDATE(c50, 5, id); FASTVQ_UPDATE(c51, 5, id1);
    id = _mm512_add_epi32(id1, step);
  }
  if (q < npanels) {  // odd number of panels: the last one alone
    const float* b = panels + q * d * kPanel;
    const float* a = xpack;
    __m512 c0 = _mm512_load_ps(norms + q * kPanel);
    __m512 c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
    for (int64_t p = 0; p < d; ++p, a += R, b += kPanel) {
      const __m512 e0 = _mm512_load_ps(b);
      c0 = _mm512_fmadd_ps(_mm512_set1_ps(a[0]), e0, c0);
      c1 = _mm512_fmadd_ps(_mm512_set1_ps(a[1]), e0, c1);
      c2 = _mm512_fmadd_ps(_mm512_set1_ps(a[2]), e0, c2);
      c3 = _mm512_fmadd_ps(_mm512_set1_ps(a[3]), e0, c3);
      c4 = _mm512_fmadd_ps(_mm512_set1_ps(a[4]), e0, c4);
      c5 = _mm512_fmadd_ps(_mm512_set1_ps(a[5]), e0, c5);
    }
    FASTVQ_UPDATE(c0, 0, id); FASTVQ_UPDATE(c1, 1, id); FASTVQ_UPDATE(c2, 2, id);
    FASTVQ_UPDATE(c3, 3, id); FASTVQ_UPDATE(c4, 4, id); FASTVQ_UPDATE(c5, 5, id);
  }

  // Cross-lane reduction (smallest value, ties to the smallest index), merged strictly into
  // the row's best. Lanes never updated hold the row's best itself, which cannot pass.
  alignas(64) float val[R][kPanel];
  alignas(64) int32_t idx[R][kPanel];
  _mm512_store_ps(val[0], v0); _mm512_store_ps(val[1], v1); _mm512_store_ps(val[2], v2);
  _mm512_store_ps(val[3], v3); _mm512_store_ps(val[4], v4); _mm512_store_ps(val[5], v5);
  _mm512_store_si512(idx[0], i0); _mm512_store_si512(idx[1], i1); _mm512_store_si512(idx[2], i2);
  _mm512_store_si512(idx[3], i3); _mm512_store_si512(idx[4], i4); _mm512_store_si512(idx[5], i5);
  merge_lanes(val, idx, R, code_base, best_val, best_idx);
}

#undef FASTVQ_UPDATE

}  // namespace fastvq::cpu

// ---- a tile with fewer rows (kernels.h: SearchFewRowsFn) ----
namespace fastvq::cpu {
namespace {

// RR rows against PP panels at a time: RR * PP independent accumulator chains (enough to hide the
// FMA latency when RR is small). Each (row, code) value is the full tile's: ||e||^2, then one FMA
// per p in order; the lanes see their codes in increasing order, as there.
template <int RR, int PP>
void few_rows(const float* xpack, int64_t d, const float* panels, const float* norms, int64_t npanels,
              int64_t code_base, float* best_val, int64_t* best_idx) {
  __m512 v[RR];
  __m512i ix[RR];
  for (int r = 0; r < RR; ++r) {
    v[r] = _mm512_set1_ps(best_val[r]);
    ix[r] = _mm512_setzero_si512();
  }
  __m512i id = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(kPanel);
  int64_t q = 0;
  auto block = [&](auto panels_now) {
    constexpr int P = decltype(panels_now)::value;
    __m512 c[RR][P];
    for (int j = 0; j < P; ++j) {
      const __m512 n = _mm512_load_ps(norms + (q + j) * kPanel);
      for (int r = 0; r < RR; ++r) c[r][j] = n;
    }
    const float* a = xpack;
    const float* b = panels + q * d * kPanel;
    for (int64_t p = 0; p < d; ++p, a += R, b += kPanel) {
      __m512 e[P];
      for (int j = 0; j < P; ++j) e[j] = _mm512_load_ps(b + j * d * kPanel);
      for (int r = 0; r < RR; ++r) {
        const __m512 x = _mm512_set1_ps(a[r]);
        for (int j = 0; j < P; ++j) c[r][j] = _mm512_fmadd_ps(x, e[j], c[r][j]);
      }
    }
    for (int j = 0; j < P; ++j) {
      for (int r = 0; r < RR; ++r) {
        const __mmask16 m = _mm512_cmp_ps_mask(c[r][j], v[r], _CMP_LT_OQ);
        v[r] = _mm512_mask_mov_ps(v[r], m, c[r][j]);
        ix[r] = _mm512_mask_mov_epi32(ix[r], m, id);
      }
      id = _mm512_add_epi32(id, step);
    }
    q += P;
  };
  while (q + PP <= npanels) block(std::integral_constant<int, PP>{});
  while (q < npanels) block(std::integral_constant<int, 1>{});
  alignas(64) float val[RR][kPanel];
  alignas(64) int32_t idx[RR][kPanel];
  for (int r = 0; r < RR; ++r) {
    _mm512_store_ps(val[r], v[r]);
    _mm512_store_si512(idx[r], ix[r]);
  }
  merge_lanes(val, idx, RR, code_base, best_val, best_idx);
}

}  // namespace

void search_few_rows_avx512(int rows, const float* xpack, int64_t d, const float* panels, const float* norms,
                            int64_t npanels, int64_t code_base, float* best_val, int64_t* best_idx) {
  switch (rows) {
    case 1: few_rows<1, 8>(xpack, d, panels, norms, npanels, code_base, best_val, best_idx); break;
    case 2: few_rows<2, 4>(xpack, d, panels, norms, npanels, code_base, best_val, best_idx); break;
    case 3: few_rows<3, 3>(xpack, d, panels, norms, npanels, code_base, best_val, best_idx); break;
    case 4: few_rows<4, 2>(xpack, d, panels, norms, npanels, code_base, best_val, best_idx); break;
    default: few_rows<5, 2>(xpack, d, panels, norms, npanels, code_base, best_val, best_idx); break;
  }
}

}  // namespace fastvq::cpu

// ---- the top-k variant (kernels.h): the same accumulation, a top-k epilogue ----
namespace fastvq::cpu {
namespace {

// The lanes of `count` accumulators (row r = acc / per_row, panel acc % per_row) strictly below
// their row's k-th value go into the row's list. The masks come first, against the thresholds
// before any insertion (a superset: topk_insert_lanes re-checks), and the accumulators are
// stored only when some lane passes, so no call sits among live accumulators.
template <int kPerRow>
__attribute__((always_inline)) inline void topk_epilogue(const __m512 (&c)[R * kPerRow], int64_t first, int k,
                                                         float* list_val, int64_t* list_idx) {
  __mmask16 m[R * kPerRow];
  uint32_t any = 0;
  for (int r = 0; r < R; ++r) {
    const __m512 threshold = _mm512_set1_ps(list_val[r * k + k - 1]);
    for (int h = 0; h < kPerRow; ++h) {
      m[r * kPerRow + h] = _mm512_cmp_ps_mask(c[r * kPerRow + h], threshold, _CMP_LT_OQ);
      any |= m[r * kPerRow + h];
    }
  }
  if (!any) return;
  alignas(64) float buf[R * kPerRow][kPanel];
  for (int i = 0; i < R * kPerRow; ++i) _mm512_store_ps(buf[i], c[i]);
  for (int i = 0; i < R * kPerRow; ++i)
    if (m[i])
      topk_insert_lanes(buf[i], m[i], first + (i % kPerRow) * kPanel, k, list_val + (i / kPerRow) * k,
                        list_idx + (i / kPerRow) * k);
}

}  // namespace

void search_tile_topk_avx512(const float* xpack, int64_t d, const float* panels, const float* norms,
                             int64_t npanels, int64_t code_base, int k, float* list_val, int64_t* list_idx) {
  int64_t q = 0;
  for (; q + 2 <= npanels; q += 2) {
    const float* b = panels + q * d * kPanel;
    const float* b2 = b + d * kPanel;
    const float* a = xpack;
    __m512 c00 = _mm512_load_ps(norms + q * kPanel), c01 = _mm512_load_ps(norms + (q + 1) * kPanel);
    __m512 c10 = c00, c11 = c01, c20 = c00, c21 = c01, c30 = c00, c31 = c01, c40 = c00,
           c41 = c01, c50 = c00, c51 = c01;
    for (int64_t p = 0; p < d; ++p, a += R, b += kPanel, b2 += kPanel) {
      const __m512 e0 = _mm512_load_ps(b), e1 = _mm512_load_ps(b2);
      __m512 x;
      x = _mm512_set1_ps(a[0]); c00 = _mm512_fmadd_ps(x, e0, c00); c01 = _mm512_fmadd_ps(x, e1, c01);
      x = _mm512_set1_ps(a[1]); c10 = _mm512_fmadd_ps(x, e0, c10); c11 = _mm512_fmadd_ps(x, e1, c11);
      x = _mm512_set1_ps(a[2]); c20 = _mm512_fmadd_ps(x, e0, c20); c21 = _mm512_fmadd_ps(x, e1, c21);
      x = _mm512_set1_ps(a[3]); c30 = _mm512_fmadd_ps(x, e0, c30); c31 = _mm512_fmadd_ps(x, e1, c31);
      x = _mm512_set1_ps(a[4]); c40 = _mm512_fmadd_ps(x, e0, c40); c41 = _mm512_fmadd_ps(x, e1, c41);
      x = _mm512_set1_ps(a[5]); c50 = _mm512_fmadd_ps(x, e0, c50); c51 = _mm512_fmadd_ps(x, e1, c51);
    }
    const __m512 c[R * 2] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
    topk_epilogue<2>(c, code_base + q * kPanel, k, list_val, list_idx);
  }
  if (q < npanels) {  // odd number of panels: the last one alone
    const float* b = panels + q * d * kPanel;
    const float* a = xpack;
    __m512 c0 = _mm512_load_ps(norms + q * kPanel);
    __m512 c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
    for (int64_t p = 0; p < d; ++p, a += R, b += kPanel) {
      const __m512 e0 = _mm512_load_ps(b);
      c0 = _mm512_fmadd_ps(_mm512_set1_ps(a[0]), e0, c0);
      c1 = _mm512_fmadd_ps(_mm512_set1_ps(a[1]), e0, c1);
      c2 = _mm512_fmadd_ps(_mm512_set1_ps(a[2]), e0, c2);
      c3 = _mm512_fmadd_ps(_mm512_set1_ps(a[3]), e0, c3);
      c4 = _mm512_fmadd_ps(_mm512_set1_ps(a[4]), e0, c4);
      c5 = _mm512_fmadd_ps(_mm512_set1_ps(a[5]), e0, c5);
    }
    const __m512 c[R] = {c0, c1, c2, c3, c4, c5};
    topk_epilogue<1>(c, code_base + q * kPanel, k, list_val, list_idx);
  }
}

}  // namespace fastvq::cpu
