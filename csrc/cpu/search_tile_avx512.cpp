// AVX-512F micro-kernel of nearest_code. The only file compiled with -mavx512f; called through
// simd.cpp only after __builtin_cpu_supports("avx512f") (which also checks that the OS saves
// the zmm state). An optional extra: CI machines are AVX2-only, search_tile_avx2.cpp is the
// path that must be fast everywhere.
//
// Deliberately free of the C++ standard library (see kernels.h): intrinsics and raw loops.
//
// Same packing as every level (panels of 16 codes = one zmm). Register blocking: the 6-row
// packed tile against two consecutive panels, 12 zmm accumulators initialised with ||e||^2;
// per p: 2 loads, 6 broadcasts, 12 FMAs, and 2 prefetches of the next pair's lines. The lane-wise
// running best of the 6 rows (value and index, 12 zmm) stays in registers: 32 zmm registers leave
// room for it, and the masked compare + 2 masked moves epilogue is 3 cheap instructions per
// accumulator.
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "cpu/kernels.h"
#include "cpu/merge_lanes_simd.h"

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

  // The same line of the next pair of panels: each panel is d lines of its own (one 4 KiB page at
  // d = 64), which the hardware prefetchers do not run ahead into, so a tile streaming its
  // panels from memory or L3 would wait on every first line.
  const int64_t ahead = 2 * d * kPanel;
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
      _mm_prefetch(reinterpret_cast<const char*>(b + ahead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(b2 + ahead), _MM_HINT_T0);
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
  merge_lanes_zmm(v0, i0, code_base, best_val[0], best_idx[0]);
  merge_lanes_zmm(v1, i1, code_base, best_val[1], best_idx[1]);
  merge_lanes_zmm(v2, i2, code_base, best_val[2], best_idx[2]);
  merge_lanes_zmm(v3, i3, code_base, best_val[3], best_idx[3]);
  merge_lanes_zmm(v4, i4, code_base, best_val[4], best_idx[4]);
  merge_lanes_zmm(v5, i5, code_base, best_val[5], best_idx[5]);
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
  for (int r = 0; r < RR; ++r) merge_lanes_zmm(v[r], ix[r], code_base, best_val[r], best_idx[r]);
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

// One row's list in C zmm chunks (lane j of chunk c: entry 16c + j; values, int32 codes), loaded
// only when some score of the row passes its k-th value. Lanes k and up start at +inf and are
// never stored back; an insertion shifts them like the others, so the first k lanes stay the k
// smallest whatever lands beyond them.
template <int C>
struct RowList {
  __m512 v[C];
  __m512i i[C];
};

__attribute__((always_inline)) inline __mmask16 lanes_below(int k, int c) {
  const int left = k - 16 * c;
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
}

// Insert (value vb, code ib), both broadcast, after every entry <= it (earlier codes win ties):
// entry j keeps its own pair where it is <= vb, takes the new one where only entry j - 1 is, and
// entry j - 1's pair otherwise (the shift). No branch: a pair past the k-th lands in lane >= k.
template <int C>
__attribute__((always_inline)) inline void insert(RowList<C>& l, __m512 vb, __m512i ib) {
  const __m512i back = _mm512_setr_epi32(31, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14);
  __m512 sv[C];
  __m512i si[C];
  sv[0] = _mm512_mask_permutexvar_ps(_mm512_set1_ps(-__builtin_inff()), 0xFFFE, back, l.v[0]);
  si[0] = _mm512_maskz_permutexvar_epi32(0xFFFE, back, l.i[0]);  // lane 0 never taken: sv[0]'s is -inf
  for (int c = 1; c < C; ++c) {  // lane 0 from chunk c - 1's lane 15
    sv[c] = _mm512_permutex2var_ps(l.v[c], back, l.v[c - 1]);
    si[c] = _mm512_permutex2var_epi32(l.i[c], back, l.i[c - 1]);
  }
  for (int c = 0; c < C; ++c) {
    const __mmask16 stay = _mm512_cmp_ps_mask(l.v[c], vb, _CMP_LE_OQ);
    const __mmask16 after = _mm512_cmp_ps_mask(sv[c], vb, _CMP_LE_OQ);
    l.v[c] = _mm512_mask_mov_ps(_mm512_mask_mov_ps(sv[c], after, vb), stay, l.v[c]);
    l.i[c] = _mm512_mask_mov_epi32(_mm512_mask_mov_epi32(si[c], after, ib), stay, l.i[c]);
  }
}

// The lanes of `mask` (bit j: score values[j] of code first + j) into one row's list, in code order.
template <int C>
__attribute__((noinline)) void insert_lanes(const float* values, uint32_t mask, int64_t first, int k,
                                            float* list_val, int32_t* list_idx) {
  RowList<C> l;
  for (int c = 0; c < C; ++c) {
    l.v[c] = _mm512_mask_loadu_ps(_mm512_set1_ps(__builtin_inff()), lanes_below(k, c), list_val + 16 * c);
    l.i[c] = _mm512_maskz_loadu_epi32(lanes_below(k, c), list_idx + 16 * c);
  }
  while (mask) {
    const int j = __builtin_ctz(mask);
    mask &= mask - 1;
    insert<C>(l, _mm512_set1_ps(values[j]), _mm512_set1_epi32(static_cast<int32_t>(first + j)));
  }
  for (int c = 0; c < C; ++c) {
    _mm512_mask_storeu_ps(list_val + 16 * c, lanes_below(k, c), l.v[c]);
    _mm512_mask_storeu_epi32(list_idx + 16 * c, lanes_below(k, c), l.i[c]);
  }
}

// The scores of row r (accumulators r * kPerRow + h: codes first + 16h + lane) strictly below the
// row's k-th value go into its list: one compare per accumulator, and the accumulators are stored
// only when some lane passes, so no call sits among live accumulators.
template <int C, int kPerRow>
__attribute__((always_inline)) inline void topk_epilogue(const __m512 (&c)[R * kPerRow], int64_t first, int k,
                                                         float* list_val, int32_t* list_idx) {
  uint32_t m[R];
  uint32_t any = 0;
  for (int r = 0; r < R; ++r) {
    const __m512 threshold = _mm512_set1_ps(list_val[r * k + k - 1]);
    m[r] = 0;
    for (int h = 0; h < kPerRow; ++h)
      m[r] |= static_cast<uint32_t>(_mm512_cmp_ps_mask(c[r * kPerRow + h], threshold, _CMP_LT_OQ)) << (16 * h);
    any |= m[r];
  }
  if (!any) return;
  alignas(64) float buf[R][kPanel * kPerRow];
  for (int i = 0; i < R * kPerRow; ++i) _mm512_store_ps(buf[i / kPerRow] + (i % kPerRow) * kPanel, c[i]);
  for (int r = 0; r < R; ++r)
    if (m[r]) insert_lanes<C>(buf[r], m[r], first, k, list_val + r * k, list_idx + r * k);
}

template <int C>
void tile_topk(const float* xpack, int64_t d, const float* panels, const float* norms, int64_t npanels,
               int64_t code_base, int k, float* list_val, int32_t* list_idx) {
  const int64_t ahead = 2 * d * kPanel;  // as search_tile_avx512
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
      _mm_prefetch(reinterpret_cast<const char*>(b + ahead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(b2 + ahead), _MM_HINT_T0);
      __m512 x;
      x = _mm512_set1_ps(a[0]); c00 = _mm512_fmadd_ps(x, e0, c00); c01 = _mm512_fmadd_ps(x, e1, c01);
      x = _mm512_set1_ps(a[1]); c10 = _mm512_fmadd_ps(x, e0, c10); c11 = _mm512_fmadd_ps(x, e1, c11);
      x = _mm512_set1_ps(a[2]); c20 = _mm512_fmadd_ps(x, e0, c20); c21 = _mm512_fmadd_ps(x, e1, c21);
      x = _mm512_set1_ps(a[3]); c30 = _mm512_fmadd_ps(x, e0, c30); c31 = _mm512_fmadd_ps(x, e1, c31);
      x = _mm512_set1_ps(a[4]); c40 = _mm512_fmadd_ps(x, e0, c40); c41 = _mm512_fmadd_ps(x, e1, c41);
      x = _mm512_set1_ps(a[5]); c50 = _mm512_fmadd_ps(x, e0, c50); c51 = _mm512_fmadd_ps(x, e1, c51);
    }
    const __m512 c[R * 2] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
    topk_epilogue<C, 2>(c, code_base + q * kPanel, k, list_val, list_idx);
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
    topk_epilogue<C, 1>(c, code_base + q * kPanel, k, list_val, list_idx);
  }
}

}  // namespace

void search_tile_topk_avx512(const float* xpack, int64_t d, const float* panels, const float* norms,
                             int64_t npanels, int64_t code_base, int k, float* list_val, int32_t* list_idx) {
  switch ((k + 15) / 16) {  // k <= 64: at most 4 chunks
    case 1: tile_topk<1>(xpack, d, panels, norms, npanels, code_base, k, list_val, list_idx); break;
    case 2: tile_topk<2>(xpack, d, panels, norms, npanels, code_base, k, list_val, list_idx); break;
    case 3: tile_topk<3>(xpack, d, panels, norms, npanels, code_base, k, list_val, list_idx); break;
    default: tile_topk<4>(xpack, d, panels, norms, npanels, code_base, k, list_val, list_idx); break;
  }
}

}  // namespace fastvq::cpu
