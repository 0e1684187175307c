// The rotation trick's row math (rotation_row.inc) on AVX-512 vectors of 8 doubles. Compiled with
// -mavx512f and -ffp-contract=off, called only after the run-time CPU check (quantize_backward.cpp);
// bitwise the portable version.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "cpu/rotation_row.h"

namespace fastvq::cpu {
namespace {

struct Ops {
  using V = __m512d;
  static constexpr int W = 8;
  static V zero() { return _mm512_setzero_pd(); }
  static V set1(double v) { return _mm512_set1_pd(v); }
  // maskz throughout: GCC 12's plain forms trip -Wmaybe-uninitialized on their own undefined sources.
  static V load(const float* p) { return _mm512_maskz_cvtps_pd(0xFF, _mm256_loadu_ps(p)); }
  static V load_d(const double* p) { return _mm512_loadu_pd(p); }
  static void store_d(double* p, V v) { _mm512_storeu_pd(p, v); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, _mm512_maskz_cvtpd_ps(0xFF, v)); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
  static V fma_exact(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  static double reduce(V v) {  // (lane j + lane j + 4), (lane j + lane j + 2), then lane 0 + lane 1
    const __m256d low = _mm512_maskz_extractf64x4_pd(0xF, v, 0), high = _mm512_maskz_extractf64x4_pd(0xF, v, 1);
    const __m256d four = _mm256_add_pd(low, high);
    const __m128d two = _mm_add_pd(_mm256_castpd256_pd128(four), _mm256_extractf128_pd(four, 1));
    return _mm_cvtsd_f64(_mm_add_sd(two, _mm_unpackhi_pd(two, two)));
  }
};

#include "cpu/rotation_row.inc"

}  // namespace

RotationCode rotation_code_avx512(const float* q, int64_t d) { return code_impl(q, d); }

void rotation_rows_avx512(const float* g, const float* x, const float* codebook, const int64_t* indices,
                         const RotationCode* codes, int64_t begin, int64_t end, int64_t d,
                         float commit_scale, double* scratch, float* out) {
  rows_impl(g, x, codebook, indices, codes, begin, end, d, commit_scale, scratch, out);
}

}  // namespace fastvq::cpu
