// AVX-512F per-code row sums (code_groups.h: CodeSumFn). Compiled with -mavx512f, called only after
// the run-time CPU check (code_groups.cpp picks it by the dispatcher's level). Each dimension adds the
// rows in the given order in double, as the portable loop does, so the sums are bitwise the same.
#include <immintrin.h>

#include <cstdint>

#include "cpu/code_groups.h"
#include "cpu/prefetch.h"

namespace fastvq::cpu {

namespace {

// maskz: GCC 12's plain _mm512_cvtps_pd trips -Wmaybe-uninitialized on its own undefined source.
inline __m512d widen(const float* p) { return _mm512_maskz_cvtps_pd(0xFF, _mm256_loadu_ps(p)); }

}  // namespace

void code_sum_avx512(const float* x, int64_t d, const int64_t* rows, int64_t count, double* sums) {
  constexpr int64_t kAhead = 4;  // rows are scattered over x: fetch a few ahead (first pass only)
  int64_t p = 0;
  for (; p + 32 <= d; p += 32) {  // four independent chains of 8 dimensions
    __m512d a0 = _mm512_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t t = 0; t < count; ++t) {
      if (p == 0 && t + kAhead < count) {
        prefetch_lines(x + rows[t + kAhead] * d, d * static_cast<int64_t>(sizeof(float)));
      }
      const float* r = x + rows[t] * d + p;
      a0 = _mm512_add_pd(a0, widen(r));
      a1 = _mm512_add_pd(a1, widen(r + 8));
      a2 = _mm512_add_pd(a2, widen(r + 16));
      a3 = _mm512_add_pd(a3, widen(r + 24));
    }
    _mm512_storeu_pd(sums + p, a0);
    _mm512_storeu_pd(sums + p + 8, a1);
    _mm512_storeu_pd(sums + p + 16, a2);
    _mm512_storeu_pd(sums + p + 24, a3);
  }
  for (; p < d; p += 8) {  // the last < 32 dimensions, 8 at a time, the tail masked
    const int64_t width = d - p < 8 ? d - p : 8;
    const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(width)),
                                             _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m512d a = _mm512_setzero_pd();
    for (int64_t t = 0; t < count; ++t)
      a = _mm512_add_pd(a, _mm512_maskz_cvtps_pd(0xFF, _mm256_maskload_ps(x + rows[t] * d + p, lanes)));
    _mm512_mask_storeu_pd(sums + p, static_cast<__mmask8>((1u << width) - 1), a);
  }
}

void row_add_avx512(const float* row, int64_t d, double* sums) {
  int64_t p = 0;
  for (; p + 8 <= d; p += 8) _mm512_storeu_pd(sums + p, _mm512_add_pd(_mm512_loadu_pd(sums + p), widen(row + p)));
  for (; p < d; ++p) sums[p] += row[p];
}

}  // namespace fastvq::cpu
