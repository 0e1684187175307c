// The int8 prefilter scans' shared epilogue (prefilter.h), AVX-512: included only by the files compiled with
// its flags (prefilter_avx512.cpp, the VNNI scan; prefilter_amx.cpp, the AMX-INT8 scan). Internal linkage on
// purpose: each file keeps its own copy, built with its own flags (an inline function merged across files
// built for different ISAs could run the wrong one). Free of the C++ standard library (see kernels.h).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu/prefetch.h"
#include "cpu/prefilter.h"

namespace fastvq::cpu {
namespace {  // NOLINT(google-build-namespaces): see above

// Prefetch panels [q, q + count) when they end at or below prefetch_end.
inline void prefetch_panels(const QuantizedCodes& codes, int64_t q, int64_t count, int64_t prefetch_end) {
  if (q + count > prefetch_end) return;
  const int64_t panel_bytes = codes.d4 * kQuantGroupBytes;
  prefetch_lines(codes.bytes + q * panel_bytes, count * panel_bytes);
}

// The code indices 16 q .. 16 q + 15 of panel q.
inline __m512i panel_ids(int64_t q) {
  return _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                          _mm512_set1_epi32(static_cast<int32_t>(q * 16)));
}

// One panel's per-code values for the epilogue, loaded once for all the rows.
struct PanelTerms {
  __m512 scale, norm;
  __m512i ids;
  PanelTerms(const QuantizedCodes& codes, int64_t q)
      : scale(_mm512_load_ps(codes.scale + q * 16)), norm(_mm512_load_ps(codes.norm + q * 16)), ids(panel_ids(q)) {}
};

// S~ = norm + (s_e s_x) * dot of one row (s_x broadcast in row_scale) and one panel (acc = r . q).
inline __m512 approximate_scores(__m512i acc, __m512 row_scale, const PanelTerms& panel) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(panel.scale, row_scale), panel.norm);
}

// The codes of `passed` after the row's `count` candidates, with their S~; past `cap` the row is marked
// overflowed (count = cap + 1: the driver searches it in full).
inline void list_codes(__mmask16 passed, __m512i ids, __m512 s, int32_t* cand, float* cand_val, int64_t cap,
                       int64_t& count) {
  const int n = __builtin_popcount(static_cast<unsigned>(passed));
  if (count + n > cap) {
    count = cap + 1;
    return;
  }
  _mm512_mask_compressstoreu_epi32(cand + count, passed, ids);
  _mm512_mask_compressstoreu_ps(cand_val + count, passed, s);
  count += n;
}

// The row's threshold from its minimum S~ (rounded up: any value >= min S~ is sound).
inline float list_threshold(float min_s, const QuantizedRow& qrow) {
  return _mm_cvtss_f32(_mm_add_round_ss(_mm_set_ss(min_s), _mm_set_ss(qrow.spread),
                                        _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
}

// The lanes of s0 and s1 (panels with codes ids0 and ids1) that passed a row's threshold, m0 and m1: where
// the smallest is below the row's minimum min_s, it becomes the minimum, threshold is recomputed and the
// lanes above it are dropped; the rest are listed, s0's first. Out of line: the folds' loops stay unrolled.
__attribute__((noinline)) inline void list_passing(__m512 s0, __mmask16 m0, __m512i ids0, __m512 s1,
                                                   __mmask16 m1, __m512i ids1, const QuantizedRow& qrow,
                                                   float& min_s, float& threshold, int32_t* cand, float* cand_val,
                                                   int64_t cap, int64_t& count) {
  const __m512 inf = _mm512_set1_ps(__builtin_inff());
  const __m512 passed = _mm512_min_ps(_mm512_mask_blend_ps(m0, inf, s0), _mm512_mask_blend_ps(m1, inf, s1));
  const float low = _mm512_reduce_min_ps(passed);
  if (low < min_s) {
    min_s = low;
    threshold = list_threshold(low, qrow);
    const __m512 lower = _mm512_set1_ps(threshold);
    m0 = _mm512_mask_cmp_ps_mask(m0, s0, lower, _CMP_LE_OQ);
    m1 = _mm512_mask_cmp_ps_mask(m1, s1, lower, _CMP_LE_OQ);
  }
  if (m0) list_codes(m0, ids0, s0, cand, cand_val, cap, count);
  if (m1) list_codes(m1, ids1, s1, cand, cand_val, cap, count);
}

// The warm-up's panels listed from their kept S~ (warm: panel w's 16 at warm + 16 w), against the row's
// minimum after them: the codes a second pass over those panels would list, in the same order, without
// multiplying them again.
inline void list_warm_up(const float* warm, int64_t warmup, int64_t q_begin, float min_s, const QuantizedRow& qrow,
                         int32_t* cand, float* cand_val, int64_t cap, int64_t& count) {
  const __m512 threshold = _mm512_set1_ps(list_threshold(min_s, qrow));
  for (int64_t w = 0; w < warmup; ++w) {
    const __m512 s = _mm512_load_ps(warm + 16 * w);
    const __mmask16 m = _mm512_cmp_ps_mask(s, threshold, _CMP_LE_OQ);
    if (m) list_codes(m, panel_ids(q_begin + w), s, cand, cand_val, cap, count);
  }
}

}  // namespace
}  // namespace fastvq::cpu
