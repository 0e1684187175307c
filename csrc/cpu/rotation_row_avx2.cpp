// The rotation trick's row math (rotation_row.inc) on AVX vectors of 4 doubles. Compiled with -mavx2 and
// -ffp-contract=off, called only after the run-time CPU check (quantize_backward.cpp); bitwise the
// portable version.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "cpu/rotation_row.h"

namespace fastvq::cpu {
namespace {

struct Ops {
  using V = __m256d;
  static constexpr int W = 4;
  static V zero() { return _mm256_setzero_pd(); }
  static V set1(double v) { return _mm256_set1_pd(v); }
  static V load(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
  static V load_d(const double* p) { return _mm256_loadu_pd(p); }
  static void store_d(double* p, V v) { _mm256_storeu_pd(p, v); }
  static void store(float* p, V v) { _mm_storeu_ps(p, _mm256_cvtpd_ps(v)); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static V fma_exact(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static double reduce(V v) {  // (lane j + lane j + 2), then lane 0 + lane 1
    const __m128d two = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(two, _mm_unpackhi_pd(two, two)));
  }
};

#include "cpu/rotation_row.inc"

}  // namespace

RotationCode rotation_code_avx2(const float* q, int64_t d) { return code_impl(q, d); }

void rotation_rows_avx2(const float* g, const float* x, const float* codebook, const int64_t* indices,
                         const RotationCode* codes, int64_t begin, int64_t end, int64_t d,
                         float commit_scale, double* scratch, float* out) {
  rows_impl(g, x, codebook, indices, codes, begin, end, d, commit_scale, scratch, out);
}

}  // namespace fastvq::cpu
