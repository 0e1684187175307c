// AVX-512F chains of the FMA-peak yardstick (fma_peak.h). Compiled with -mavx512f, called only
// after the run-time CPU check (fma_peak.cpp, through the search dispatcher's level).
#include <immintrin.h>

#include <cstdint>

#include "cpu/fma_peak.h"

namespace fastvq::cpu {

float fma_chains_avx512(int64_t iters, float a, float b) {
  constexpr int C = kFmaChainsAvx512;
  const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
  __m512 acc[C];
#pragma GCC unroll 16
  for (int c = 0; c < C; ++c) acc[c] = _mm512_set1_ps(static_cast<float>(c));
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(acc[c], va, vb);
  }
  __m512 total = acc[0];
  for (int c = 1; c < C; ++c) total = _mm512_add_ps(total, acc[c]);
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, total);
  float sum = 0.0f;
  for (float lane : lanes) sum += lane;
  return sum;
}

}  // namespace fastvq::cpu
