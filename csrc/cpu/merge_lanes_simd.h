// merge_lanes' rule (kernels.h) for lanes still in vector registers: the smallest value over the 16
// lanes, then the smallest code index among the lanes holding it, merged into the row's best only when
// strictly smaller. Two reductions and one predictable branch a row, where the scalar merge takes a
// hard-to-predict branch per lane. No lane is NaN (lanes only take values that compared "<").
//
// Included only by kernel files compiled with the instructions used (AVX2, AVX-512F); the anonymous
// namespace gives each of them its own copy, so no other file can link to a version its CPU lacks.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace fastvq::cpu {
namespace {

#if defined(__AVX512F__)
inline void merge_lanes_zmm(__m512 val, __m512i idx, int64_t code_base, float& best_val, int64_t& best_idx) {
  const float v = _mm512_reduce_min_ps(val);
  if (!(v < best_val)) return;
  const __mmask16 holding = _mm512_cmp_ps_mask(val, _mm512_set1_ps(v), _CMP_EQ_OQ);
  best_val = v;
  best_idx = code_base + _mm512_mask_reduce_min_epi32(holding, idx);
}
#endif

#if defined(__AVX2__)
// The 16 lanes as two halves (codes 8h + j of each panel in half h).
inline void merge_lanes_ymm(__m256 val_lo, __m256 val_hi, __m256i idx_lo, __m256i idx_hi, int64_t code_base,
                            float& best_val, int64_t& best_idx) {
  __m256 m = _mm256_min_ps(val_lo, val_hi);
  m = _mm256_min_ps(m, _mm256_permute2f128_ps(m, m, 1));
  m = _mm256_min_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm256_min_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(2, 3, 0, 1)));  // every lane: the minimum
  const float v = _mm256_cvtss_f32(m);
  if (!(v < best_val)) return;
  const __m256i none = _mm256_set1_epi32(INT32_MAX);
  const __m256i lo = _mm256_blendv_epi8(none, idx_lo, _mm256_castps_si256(_mm256_cmp_ps(val_lo, m, _CMP_EQ_OQ)));
  const __m256i hi = _mm256_blendv_epi8(none, idx_hi, _mm256_castps_si256(_mm256_cmp_ps(val_hi, m, _CMP_EQ_OQ)));
  __m256i i = _mm256_min_epi32(lo, hi);
  i = _mm256_min_epi32(i, _mm256_permute2x128_si256(i, i, 1));
  i = _mm256_min_epi32(i, _mm256_shuffle_epi32(i, _MM_SHUFFLE(1, 0, 3, 2)));
  i = _mm256_min_epi32(i, _mm256_shuffle_epi32(i, _MM_SHUFFLE(2, 3, 0, 1)));
  best_val = v;
  best_idx = code_base + _mm256_cvtsi256_si32(i);
}
#endif

}  // namespace
}  // namespace fastvq::cpu
