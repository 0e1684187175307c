// AVX2+FMA chains of the FMA-peak yardstick (fma_peak.h). Compiled with -mavx2 -mfma, called only
// after the run-time CPU check (fma_peak.cpp, through the search dispatcher's level).
#include <immintrin.h>

#include <cstdint>

#include "cpu/fma_peak.h"

namespace fastvq::cpu {

float fma_chains_avx2(int64_t iters, float a, float b) {
  constexpr int C = kFmaChainsAvx2;
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  __m256 acc[C];
#pragma GCC unroll 16
  for (int c = 0; c < C; ++c) acc[c] = _mm256_set1_ps(static_cast<float>(c));
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) acc[c] = _mm256_fmadd_ps(acc[c], va, vb);
  }
  __m256 total = acc[0];
  for (int c = 1; c < C; ++c) total = _mm256_add_ps(total, acc[c]);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, total);
  float sum = 0.0f;
  for (float lane : lanes) sum += lane;
  return sum;
}

}  // namespace fastvq::cpu
