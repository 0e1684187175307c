// AVX2 per-code row sums (code_groups.h: CodeSumFn). Compiled with -mavx2, called only after the
// run-time CPU check (code_groups.cpp picks it by the dispatcher's level). Each dimension adds the
// rows in the given order in double, as the portable loop does, so the sums are bitwise the same.
#include <immintrin.h>

#include <cstdint>

#include "cpu/code_groups.h"
#include "cpu/prefetch.h"

namespace fastvq::cpu {

namespace {

inline __m256d widen(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }

}  // namespace

void code_sum_avx2(const float* x, int64_t d, const int64_t* rows, int64_t count, double* sums) {
  constexpr int64_t kAhead = 4;  // rows are scattered over x: fetch a few ahead (first pass only)
  int64_t p = 0;
  for (; p + 32 <= d; p += 32) {  // eight independent chains of 4 dimensions
    __m256d a[8];
    for (auto& v : a) v = _mm256_setzero_pd();
    for (int64_t t = 0; t < count; ++t) {
      if (p == 0 && t + kAhead < count) {
        prefetch_lines(x + rows[t + kAhead] * d, d * static_cast<int64_t>(sizeof(float)));
      }
      const float* r = x + rows[t] * d + p;
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) a[j] = _mm256_add_pd(a[j], widen(r + 4 * j));
    }
    for (int j = 0; j < 8; ++j) _mm256_storeu_pd(sums + p + 4 * j, a[j]);
  }
  for (; p + 4 <= d; p += 4) {
    __m256d a = _mm256_setzero_pd();
    for (int64_t t = 0; t < count; ++t) a = _mm256_add_pd(a, widen(x + rows[t] * d + p));
    _mm256_storeu_pd(sums + p, a);
  }
  for (; p < d; ++p) {
    double a = 0.0;
    for (int64_t t = 0; t < count; ++t) a += x[rows[t] * d + p];
    sums[p] = a;
  }
}

void row_add_avx2(const float* row, int64_t d, double* sums) {
  int64_t p = 0;
  for (; p + 4 <= d; p += 4) _mm256_storeu_pd(sums + p, _mm256_add_pd(_mm256_loadu_pd(sums + p), widen(row + p)));
  for (; p < d; ++p) sums[p] += row[p];
}

}  // namespace fastvq::cpu
