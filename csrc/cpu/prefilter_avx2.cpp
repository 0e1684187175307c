// The int8 prefilter's kernels (prefilter.h) for AVX2 machines: the scan, the codes' and rows' quantization
// and the candidates' float32 scores (the rescore serves every scan: it is the search kernels' scalar
// arithmetic). Compiled with -mavx2 -mfma; called through nearest_code_prefilter.cpp only at SIMD level avx2
// or above. Free of the C++ standard library (see kernels.h).
//
// AVX2 has no vpdpbusd: each 4-byte group's product is vpmaddubsw (unsigned code bytes times signed row
// levels, adjacent pairs summed to int16) then vpmaddwd with ones (pairs summed to int32) and vpaddd. The
// int16 pair sum saturates unless 2 * 255 * |r| <= 32767, so the rows' levels here fill [-64, 64]
// (kAvx2MaxLevel, prefilter.h), not [-127, 127]; the codes' bytes are the VNNI scan's. The bound (prefilter_codes.cpp)
// is formed from the levels actually used, so it stays exact, only wider by the coarser rows.
//
// Per panel of 16 codes (two 8-code halves) and up to four rows at a time (their 8 accumulators, the
// panel's two 32-byte halves and the row's broadcast 4 bytes in the 16 ymm registers), then the VNNI
// scan's epilogue: S~ = norm + (s_e s_x) * dot in one FMA, a compare with the row's threshold, and the
// rare listing out of line.
#include <immintrin.h>

#include <cstdint>

#include "cpu/prefetch.h"
#include "cpu/prefilter.h"

namespace fastvq::cpu {
namespace {

// Rows whose accumulators fit the registers together; a scan call of 5 to 8 rows makes two passes.
constexpr int kAvx2Rows = 4;
// One row's kept warm-up scores: kAvx2WarmupPanels panels of 16.
using Avx2WarmScores = float[kAvx2WarmupPanels * 16];

// The smallest float32 >= min_s + spread (a threshold may be anything >= the exact sum). The sum of two
// float32 in double is exact unless their exponents are 30 apart, and then no float32 lies strictly
// between min_s and the sum: rounding the double up to float32 is enough.
float list_threshold(float min_s, const QuantizedRow& qrow) {
  const double exact = static_cast<double>(min_s) + static_cast<double>(qrow.spread);
  float t = static_cast<float>(exact);
  if (static_cast<double>(t) < exact) {  // finite here: the next float32 up, by its bits
    uint32_t bits;
    __builtin_memcpy(&bits, &t, sizeof bits);
    if (t == 0.0f) bits = 1;            // +-0: the smallest positive subnormal
    else if (t > 0.0f) ++bits;
    else --bits;
    __builtin_memcpy(&t, &bits, sizeof t);
  }
  return t;
}

// The lanes of `passed` (bit j: code 16 q + j, S~ in s[j]) that passed a row's threshold: where the smallest
// is below the row's minimum, it becomes the minimum and the threshold is lowered; those still within it
// are listed in code order. Past `cap` the row is marked overflowed (count = cap + 1). Out of line: rare.
__attribute__((noinline)) void list_passing(const float* s, unsigned passed, int64_t q, const QuantizedRow& qrow,
                                            float& min_s, float& threshold, int32_t* cand, float* cand_val,
                                            int64_t cap, int64_t& count) {
  float low = __builtin_inff();
  for (unsigned m = passed; m; m &= m - 1) low = s[__builtin_ctz(m)] < low ? s[__builtin_ctz(m)] : low;
  if (low < min_s) {
    min_s = low;
    threshold = list_threshold(low, qrow);
  }
  unsigned listed = 0;
  for (unsigned m = passed; m; m &= m - 1)
    if (s[__builtin_ctz(m)] <= threshold) listed |= m & -m;
  const int n = __builtin_popcount(listed);
  if (count + n > cap) {
    count = cap + 1;
    return;
  }
  for (unsigned m = listed; m; m &= m - 1) {
    const int j = __builtin_ctz(m);
    cand[count] = static_cast<int32_t>(q * 16 + j);
    cand_val[count] = s[j];
    ++count;
  }
}

// One row's 16 accumulators (two halves) += the panel group's codes (c0: codes 0-7, c1: 8-15; 4 unsigned
// bytes each) times the row's 4 levels (*x, broadcast).
inline void dot4(__m256i& lo, __m256i& hi, __m256i c0, __m256i c1, const int32_t* x, __m256i ones) {
  const __m256i levels = _mm256_set1_epi32(*x);
  lo = _mm256_add_epi32(lo, _mm256_madd_epi16(_mm256_maddubs_epi16(c0, levels), ones));
  hi = _mm256_add_epi32(hi, _mm256_madd_epi16(_mm256_maddubs_epi16(c1, levels), ones));
}

// One panel's per-code values for the epilogue, loaded once for all the rows.
struct PanelTerms {
  __m256 scale[2], norm[2];
  PanelTerms(const QuantizedCodes& codes, int64_t q) {
    for (int h = 0; h < 2; ++h) {
      scale[h] = _mm256_load_ps(codes.scale + q * 16 + 8 * h);
      norm[h] = _mm256_load_ps(codes.norm + q * 16 + 8 * h);
    }
  }
};

// The epilogue of one row and one panel (prefilter_fold.h's, in two halves). Listing (kEmit): a compare with
// the threshold, the listing behind a branch; the warm-up (!kEmit): S~ kept at `warm`, a minimum per lane.
template <bool kEmit>
inline void fold_row(__m256i lo, __m256i hi, const QuantizedRow& qrow, const PanelTerms& panel, int64_t q,
                     __m256 (&run)[2], float& min_s, float& threshold, int32_t* cand, float* cand_val, int64_t cap,
                     int64_t& count, float* warm) {
  const __m256 row_scale = _mm256_set1_ps(qrow.scale);
  const __m256 s0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_mul_ps(panel.scale[0], row_scale), panel.norm[0]);
  const __m256 s1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_mul_ps(panel.scale[1], row_scale), panel.norm[1]);
  if (!kEmit) {
    _mm256_store_ps(warm, s0);
    _mm256_store_ps(warm + 8, s1);
    run[0] = _mm256_min_ps(s0, run[0]);  // a NaN S~ keeps the minimum
    run[1] = _mm256_min_ps(s1, run[1]);
    return;
  }
  const __m256 limit = _mm256_set1_ps(threshold);
  const unsigned passed = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(s0, limit, _CMP_LE_OQ))) |
                          static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(s1, limit, _CMP_LE_OQ))) << 8;
  if (__builtin_expect(passed != 0, 0)) {
    alignas(32) float s[16];
    _mm256_store_ps(s, s0);
    _mm256_store_ps(s + 8, s1);
    list_passing(s, passed, q, qrow, min_s, threshold, cand, cand_val, cap, count);
  }
}

// R <= kAvx2Rows rows of an interleaved group (xq[g * kPrefilterRows + r]). Without kEmit, row r's S~ of
// panel q go to warm[r] + 16 (q - q_begin).
template <int R, bool kEmit>
void scan_panels(const int32_t* xq, const QuantizedRow* qrows, const QuantizedCodes& codes, int64_t q_begin,
                 int64_t q_end, __m256 (&run)[R][2], float (&min_s)[R], float (&threshold)[R], int32_t* cand,
                 float* cand_val, int64_t cap, int64_t* count, Avx2WarmScores* warm, int64_t prefetch_end) {
  const int64_t d4 = codes.d4, panel_bytes = d4 * kQuantGroupBytes;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i start[kAvx2Rows];  // the accumulators start at -correction: they end at r . q
  for (int r = 0; r < kAvx2Rows; ++r)
    start[r] = r < R ? _mm256_set1_epi32(-qrows[r].correction) : _mm256_setzero_si256();
  for (int64_t q = q_begin; q < q_end; ++q) {
    const uint8_t* b = codes.bytes + q * panel_bytes;
    if (q + kPrefetchPanels < prefetch_end) prefetch_lines(b + kPrefetchPanels * panel_bytes, panel_bytes);
    __m256i a0 = start[0], b0 = start[0], a1 = start[1], b1 = start[1], a2 = start[2], b2 = start[2],
            a3 = start[3], b3 = start[3];
    const int32_t* x = xq;
    for (int64_t g = 0; g < d4; ++g, x += kPrefilterRows) {
      const __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(b + g * kQuantGroupBytes));
      const __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(b + g * kQuantGroupBytes + 32));
      dot4(a0, b0, c0, c1, x, ones);
      if constexpr (R > 1) dot4(a1, b1, c0, c1, x + 1, ones);
      if constexpr (R > 2) dot4(a2, b2, c0, c1, x + 2, ones);
      if constexpr (R > 3) dot4(a3, b3, c0, c1, x + 3, ones);
    }
    const PanelTerms panel(codes, q);
    const __m256i los[kAvx2Rows] = {a0, a1, a2, a3}, his[kAvx2Rows] = {b0, b1, b2, b3};
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
      fold_row<kEmit>(los[r], his[r], qrows[r], panel, q, run[r], min_s[r], threshold[r], cand + r * cap,
                      cand_val + r * cap, cap, count[r], kEmit ? nullptr : warm[r] + 16 * (q - q_begin));
  }
}

template <int R>
void scan(const int32_t* xq, const QuantizedRow* qrows, const QuantizedCodes& codes, int64_t q_begin, int64_t q_end,
          int64_t warmup, float* running, int32_t* cand, float* cand_val, int64_t cap, int64_t* count,
          int64_t prefetch_end) {
  __m256 run[R][2];
  float min_s[R], threshold[R];
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) run[r][h] = _mm256_loadu_ps(running + 16 * r + 8 * h);
  alignas(32) Avx2WarmScores warm[R];
  if (warmup > 0)  // the minimum of the first panels first, so that they do not all pass
    scan_panels<R, false>(xq, qrows, codes, q_begin, q_begin + warmup, run, min_s, threshold, cand, cand_val, cap,
                          count, warm, prefetch_end);
  for (int r = 0; r < R; ++r) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_min_ps(run[r][0], run[r][1]));
    min_s[r] = lanes[0];
    for (int j = 1; j < 8; ++j) min_s[r] = lanes[j] < min_s[r] ? lanes[j] : min_s[r];
    threshold[r] = list_threshold(min_s[r], qrows[r]);
    const __m256 limit = _mm256_set1_ps(threshold[r]);
    for (int64_t w = 0; w < warmup; ++w) {  // the warm-up's codes, listed against the minimum after it
      const float* s = warm[r] + 16 * w;
      const unsigned passed =
          static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_load_ps(s), limit, _CMP_LE_OQ))) |
          static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_load_ps(s + 8), limit, _CMP_LE_OQ))) << 8;
      if (passed)
        list_passing(s, passed, q_begin + w, qrows[r], min_s[r], threshold[r], cand + r * cap, cand_val + r * cap,
                     cap, count[r]);
    }
  }
  scan_panels<R, true>(xq, qrows, codes, q_begin + warmup, q_end, run, min_s, threshold, cand, cand_val, cap, count,
                       nullptr, prefetch_end);
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(running + 16 * r + 8 * h, _mm256_set1_ps(min_s[r]));
}

}  // namespace

void prefilter_scan_avx2(int rows, const int32_t* xq, const QuantizedRow* qrows, const QuantizedCodes& codes,
                         int64_t q_begin, int64_t q_end, int64_t warmup, float* running, int32_t* cand,
                         float* cand_val, int64_t cap, int64_t* count, int64_t prefetch_end) {
  // Rows 0-3, then 4-7 over the same panels (from cache: the first pass read them).
  for (int r0 = 0; r0 < rows; r0 += kAvx2Rows) {
    const int r = rows - r0 < kAvx2Rows ? rows - r0 : kAvx2Rows;
    const int64_t fetch = r0 == 0 ? prefetch_end : 0;
    switch (r) {
#define FASTVQ_SCAN_CASE(R)                                                                                      \
  case R:                                                                                                        \
    scan<R>(xq + r0, qrows + r0, codes, q_begin, q_end, warmup, running + 16 * r0, cand + r0 * cap,              \
            cand_val + r0 * cap, cap, count + r0, fetch);                                                        \
    break;
      FASTVQ_SCAN_CASE(1) FASTVQ_SCAN_CASE(2) FASTVQ_SCAN_CASE(3) FASTVQ_SCAN_CASE(4)
#undef FASTVQ_SCAN_CASE
    }
  }
}


// ---- the codes' and rows' quantization and the candidates' float32 scores (prefilter.h) ----
namespace {

// p[0 .. remaining) and zeros after, of 8 floats (a plain load when all 8 are there: AMD's masked moves
// are slow).
inline __m256 load_first(const float* p, int64_t remaining) {
  if (remaining >= 8) return _mm256_loadu_ps(p);
  const int32_t r = remaining < 0 ? 0 : static_cast<int32_t>(remaining);
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

inline __m256 abs8(__m256 v) { return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))); }

// sums[0..2] += v^2, (v - s r)^2, (s r)^2 in double, exactly per term, for the 8 lanes (two of 4).
inline void add_squares(__m256 v, __m256i level, const __m256d (&scale)[2], __m256d (&sums)[3][2]) {
  const __m128 halves[2] = {_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)};
  const __m128i level_halves[2] = {_mm256_castsi256_si128(level), _mm256_extracti128_si256(level, 1)};
  for (int h = 0; h < 2; ++h) {
    const __m256d vd = _mm256_cvtps_pd(halves[h]);
    const __m256d rebuilt = _mm256_mul_pd(scale[h], _mm256_cvtepi32_pd(level_halves[h]));
    const __m256d error = _mm256_sub_pd(vd, rebuilt);
    sums[0][h] = _mm256_fmadd_pd(vd, vd, sums[0][h]);
    sums[1][h] = _mm256_fmadd_pd(error, error, sums[1][h]);
    sums[2][h] = _mm256_fmadd_pd(rebuilt, rebuilt, sums[2][h]);
  }
}

inline double sum4(__m256d v) {
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, v);
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

// round(v * inverse), clamped to [-limit, limit] (NaN and overflow give INT_MIN, clamped too).
inline __m256i round_levels(__m256 v, __m256 inverse, int32_t limit) {
  return _mm256_max_epi32(_mm256_set1_epi32(-limit),
                          _mm256_min_epi32(_mm256_set1_epi32(limit), _mm256_cvtps_epi32(_mm256_mul_ps(v, inverse))));
}

// acc += x * value, one rounding (vfmadd231ss, the value from memory). Inline asm: GCC 12 copied each of
// _mm_fmadd_ss's eight accumulators through another register every step.
inline void fma_ss(__m128& acc, __m128 x, const float& value) {
  __asm__("vfmadd231ss %2, %1, %0" : "+x"(acc) : "x"(x), "m"(value));
}

}  // namespace

// The VNNI kernel's quantization (prefilter_avx512.cpp), 8 codes at a time: the same bytes, scales and norms.
void prefilter_quantize_panel_avx2(const float* panel, int64_t d, int64_t d4, uint8_t* bytes, float* scale,
                                   double* norms) {
  for (int h = 0; h < 2; ++h) {  // codes 8 h .. 8 h + 7
    __m256 largest = _mm256_setzero_ps();
    for (int64_t p = 0; p < d; ++p) largest = _mm256_max_ps(largest, abs8(_mm256_load_ps(panel + p * 16 + 8 * h)));
    const __m256 zero = _mm256_cmp_ps(largest, _mm256_setzero_ps(), _CMP_EQ_OQ);
    const __m256 s = _mm256_blendv_ps(_mm256_div_ps(largest, _mm256_set1_ps(127.0f)), _mm256_set1_ps(1.0f), zero);
    _mm256_storeu_ps(scale + 8 * h, s);
    const __m256 inverse = _mm256_div_ps(_mm256_set1_ps(1.0f), s);
    const __m256d s_d[2] = {_mm256_cvtps_pd(_mm256_castps256_ps128(s)), _mm256_cvtps_pd(_mm256_extractf128_ps(s, 1))};
    __m256d sums[3][2];
    for (auto& pair : sums) pair[0] = pair[1] = _mm256_setzero_pd();
    for (int64_t g = 0; g < d4; ++g) {
      uint8_t* group = bytes + g * kQuantGroupBytes + 8 * h * 4;  // code 8 h + j's byte k at group[4 j + k]
      for (int k = 0; k < 4; ++k) {
        const int64_t p = 4 * g + k;
        if (p >= d) {
          for (int j = 0; j < 8; ++j) group[4 * j + k] = 128;  // level 0 past d
          continue;
        }
        const __m256 v = _mm256_load_ps(panel + p * 16 + 8 * h);
        const __m256i level = round_levels(v, inverse, 127);
        alignas(32) int32_t levels[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(levels), _mm256_add_epi32(level, _mm256_set1_epi32(128)));
        for (int j = 0; j < 8; ++j) group[4 * j + k] = static_cast<uint8_t>(levels[j]);
        add_squares(v, level, s_d, sums);
      }
    }
    for (int k = 0; k < 3; ++k) {
      _mm256_storeu_pd(norms + 16 * k + 8 * h, sums[k][0]);
      _mm256_storeu_pd(norms + 16 * k + 8 * h + 4, sums[k][1]);
    }
  }
}

float prefilter_max_abs_avx2(const float* x, const float* centre, int64_t d) {
  __m256 largest = _mm256_setzero_ps();
  for (int64_t p = 0; p < d; p += 8) {
    largest = _mm256_max_ps(largest, abs8(_mm256_sub_ps(load_first(x + p, d - p), load_first(centre + p, d - p))));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, largest);
  float m = lanes[0];
  for (int j = 1; j < 8; ++j) m = lanes[j] > m ? lanes[j] : m;
  return m;
}

int32_t prefilter_levels_avx2(const float* x, const float* centre, int64_t d, int64_t d4, float scale, int32_t* xq,
                              int64_t stride, double* sums) {
  const __m256 inverse = _mm256_set1_ps(1.0f / scale);
  const __m256d scale_d[2] = {_mm256_set1_pd(scale), _mm256_set1_pd(scale)};
  __m256d squares[3][2];
  for (auto& pair : squares) pair[0] = pair[1] = _mm256_setzero_pd();
  __m256i level_sum = _mm256_setzero_si256();
  for (int64_t p = 0; p < 4 * d4; p += 8) {
    const __m256 v = _mm256_sub_ps(load_first(x + p, d - p), load_first(centre + p, d - p));  // 0 past d
    const __m256i level = round_levels(v, inverse, kAvx2MaxLevel);
    level_sum = _mm256_add_epi32(level_sum, level);
    // Levels 0-3 to bytes 0-3, levels 4-7 to bytes 16-19 (packs work within 128-bit halves; no saturation).
    const __m256i words = _mm256_packs_epi32(level, level);
    const __m256i bytes = _mm256_packs_epi16(words, words);
    xq[(p / 4) * stride] = _mm256_extract_epi32(bytes, 0);
    if (p / 4 + 1 < d4) xq[(p / 4 + 1) * stride] = _mm256_extract_epi32(bytes, 4);
    add_squares(v, level, scale_d, squares);
  }
  for (int k = 0; k < 3; ++k) sums[k] = sum4(squares[k][0]) + sum4(squares[k][1]);
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), level_sum);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// prefilter_codes.cpp's round_up for 4 lanes (v >= 0, or NaN): the smallest float32 >= v (1 + kRoundUpSlack).
static inline __m128 round_up4(__m256d v) {
  v = _mm256_mul_pd(v, _mm256_set1_pd(1.0 + kRoundUpSlack));
  const __m128 nearest = _mm256_cvtpd_ps(v);
  const __m256d below = _mm256_cmp_pd(_mm256_cvtps_pd(nearest), v, _CMP_LT_OQ);  // rounded down: one step up
  const __m128i step = _mm256_cvtpd_epi32(_mm256_and_pd(below, _mm256_set1_pd(1.0)));
  return _mm_castsi128_ps(_mm_add_epi32(_mm_castps_si128(nearest), step));  // >= 0: the next bit pattern
}

unsigned prefilter_row_bounds_avx2(const double* norm_sq, const double* error_sq, const double* quant_sq, int count,
                                   const QuantizedCodes& codes, QuantizedRow* qrows) {
  const double u = kUnitRoundoff, dim = static_cast<double>(codes.d);
  const __m256d gamma = _mm256_set1_pd(dim * u / (1.0 - dim * u)), unit = _mm256_set1_pd(u);
  const __m256d two = _mm256_set1_pd(2.0), four_u = _mm256_set1_pd(4.0 * u), infinity = _mm256_set1_pd(__builtin_inf());
  const __m256d norm_max = _mm256_set1_pd(codes.max_norm), panel_max = _mm256_set1_pd(codes.max_panel_norm);
  const __m256d error_max = _mm256_set1_pd(codes.max_error_norm), quant_max = _mm256_set1_pd(codes.max_quant_norm);
  unsigned finite = 0;
  for (int i0 = 0; i0 < count; i0 += 4) {
    alignas(32) double lanes[3][4] = {};
    for (int i = i0; i < count && i < i0 + 4; ++i) {
      lanes[0][i - i0] = norm_sq[i];
      lanes[1][i - i0] = error_sq[i];
      lanes[2][i - i0] = quant_sq[i];
    }
    const __m256d x_norm = _mm256_sqrt_pd(_mm256_load_pd(lanes[0]));
    const __m256d x_error = _mm256_sqrt_pd(_mm256_load_pd(lanes[1]));
    const __m256d x_quant = _mm256_sqrt_pd(_mm256_load_pd(lanes[2]));
    const __m128 alpha = round_up4(x_norm), beta = round_up4(x_error);
    const __m256d alpha_d = _mm256_cvtps_pd(alpha), beta_d = _mm256_cvtps_pd(beta);
    // rho0 = gamma (N + ||x'|| P) + u (N + 2 ||x^|| H); M = (N + ||x^|| H)(1 + 2u) + 2 (alpha E + beta H + rho0)
    const __m256d rho0 = _mm256_add_pd(_mm256_mul_pd(gamma, _mm256_fmadd_pd(x_norm, panel_max, norm_max)),
                                       _mm256_mul_pd(unit, _mm256_fmadd_pd(_mm256_mul_pd(two, x_quant), quant_max,
                                                                           norm_max)));
    const __m256d largest_r = _mm256_fmadd_pd(alpha_d, error_max, _mm256_fmadd_pd(beta_d, quant_max, rho0));
    const __m256d largest = _mm256_fmadd_pd(_mm256_fmadd_pd(x_quant, quant_max, norm_max),
                                            _mm256_set1_pd(1.0 + 2.0 * u), _mm256_mul_pd(two, largest_r));
    const __m128 rho = round_up4(_mm256_fmadd_pd(four_u, largest, rho0));
    const __m256d widest_r =
        _mm256_fmadd_pd(alpha_d, error_max, _mm256_fmadd_pd(beta_d, quant_max, _mm256_cvtps_pd(rho)));
    const __m128 spread = round_up4(_mm256_fmadd_pd(_mm256_mul_pd(two, widest_r), _mm256_set1_pd(1.0 + kSpreadSlack),
                                                    _mm256_mul_pd(four_u, largest)));
    const __m256d ok = _mm256_and_pd(
        _mm256_and_pd(_mm256_cmp_pd(alpha_d, infinity, _CMP_LT_OQ), _mm256_cmp_pd(beta_d, infinity, _CMP_LT_OQ)),
        _mm256_and_pd(_mm256_cmp_pd(_mm256_cvtps_pd(rho), infinity, _CMP_LT_OQ),
                      _mm256_cmp_pd(_mm256_cvtps_pd(spread), infinity, _CMP_LT_OQ)));
    finite |= static_cast<unsigned>(_mm256_movemask_pd(ok)) << i0;
    alignas(16) float terms[4][4];
    _mm_store_ps(terms[0], alpha);
    _mm_store_ps(terms[1], beta);
    _mm_store_ps(terms[2], rho);
    _mm_store_ps(terms[3], spread);
    for (int i = i0; i < count && i < i0 + 4; ++i) {
      qrows[i].alpha = terms[0][i - i0];
      qrows[i].beta = terms[1][i - i0];
      qrows[i].rho = terms[2][i - i0];
      qrows[i].spread = terms[3][i - i0];
    }
  }
  return finite & ((1u << count) - 1u);
}

void prefilter_rescore_avx2(const float* xc, int64_t d, const float* codebook, const float* centre,
                            const float* norms, const int32_t* rows, const int32_t* codes, int64_t count,
                            float* best_val, int64_t* best_idx) {
  // Eight pairs at a time, eight FMA chains in flight (one chain's latency would dominate otherwise);
  // the last group repeats its last pair in the unused chains, whose results are not read. Each code's
  // packed values -2 (e - c) are rebuilt from its contiguous row (pack_codebook.cpp's two roundings,
  // bitwise): a panel column would cost a cache line per dimension.
  alignas(32) float values[8][kPrefilterMaxDim];
  const __m256 minus_two = _mm256_set1_ps(-2.0f);
  for (int64_t t0 = 0; t0 < count; t0 += 8) {
    const float* x[8];
    __m128 acc[8];
    for (int c = 0; c < 8; ++c) {
      const int64_t t = t0 + c < count ? t0 + c : count - 1, code = codes[t];
      const float* e = codebook + code * d;
      for (int64_t p = 0; p < d; p += 8)  // values[c][d ..] (within kPrefilterMaxDim) are not read
        _mm256_store_ps(values[c] + p, _mm256_mul_ps(minus_two, _mm256_sub_ps(load_first(e + p, d - p),
                                                                              load_first(centre + p, d - p))));
      x[c] = xc + rows[t] * d;
      acc[c] = _mm_set_ss(norms[code]);
    }
    __m128 a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3], a4 = acc[4], a5 = acc[5], a6 = acc[6], a7 = acc[7];
    for (int64_t p = 0; p < d; ++p) {  // named accumulators: an array's elements went through the stack
      fma_ss(a0, _mm_set_ss(x[0][p]), values[0][p]);
      fma_ss(a1, _mm_set_ss(x[1][p]), values[1][p]);
      fma_ss(a2, _mm_set_ss(x[2][p]), values[2][p]);
      fma_ss(a3, _mm_set_ss(x[3][p]), values[3][p]);
      fma_ss(a4, _mm_set_ss(x[4][p]), values[4][p]);
      fma_ss(a5, _mm_set_ss(x[5][p]), values[5][p]);
      fma_ss(a6, _mm_set_ss(x[6][p]), values[6][p]);
      fma_ss(a7, _mm_set_ss(x[7][p]), values[7][p]);
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3, acc[4] = a4, acc[5] = a5, acc[6] = a6, acc[7] = a7;
    for (int c = 0; c < 8 && t0 + c < count; ++c) {
      const float score = _mm_cvtss_f32(acc[c]);
      const int32_t row = rows[t0 + c];
      if (score < best_val[row]) {  // a row's candidates in increasing order: a tie keeps the lower code
        best_val[row] = score;
        best_idx[row] = codes[t0 + c];
      }
    }
  }
}

}  // namespace fastvq::cpu
