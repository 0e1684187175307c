// The int8 prefilter's kernels (prefilter.h), AVX-512 VNNI: the scan (its AMX-INT8 twin: prefilter_amx.cpp)
// and the codes' and rows' quantization (the candidates' float32 scores: prefilter_avx2.cpp). Compiled with
// -mavx512vnni (as prefilter_amx.cpp is); called through nearest_code_prefilter.cpp only after the CPU checks
// there. Free of the C++ standard library (see kernels.h).
//
// Per panel of 16 codes and each of up to kVnniScanRows rows: d4 vpdpbusd (16 codes x 4 dims each,
// the panel's 64-byte group loaded once for all the rows, the row's 4 bytes broadcast, the accumulator
// started at the row's -correction), then S~ = norm + (s_e s_x) * dot in one FMA and a compress-store of
// the codes within the row's spread of its running minimum (prefilter.h, prefilter_fold.h). Candidates are
// rare after the first panels, so the store sits behind a branch. The warm-up panels'
// S~ are kept on the stack and listed once their minimum is known (list_warm_up), not multiplied twice.
#include <immintrin.h>

#include <cstdint>

#include "cpu/int8_speed.h"
#include "cpu/prefilter.h"
#include "cpu/prefilter_fold.h"

namespace fastvq::cpu {
namespace {

// One row's kept warm-up scores: kVnniWarmupPanels panels of 16.
using VnniWarmScores = float[kVnniWarmupPanels * 16];

// acc += the 16 codes' 4-byte groups (c, unsigned) times the row's 4 bytes (*x, signed, broadcast).
// Inline asm: GCC 12 copies every accumulator of _mm512_dpbusd_epi32 through another register
// each iteration (2 moves per vpdpbusd), which halved the scan's speed.
inline void dot4(__m512i& acc, __m512i c, const int32_t* x) {
  __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(c), "m"(*x));
}

// The epilogue of one row and one panel. Listing (kEmit): S~, and the codes within the row's spread of its
// minimum so far listed with their S~; the minimum is one float (min_s, list_threshold of it in threshold),
// changed only where a code passes the threshold, as any code below the minimum does, so the common case is
// S~ and one compare (a NaN S~, a code that cannot win, passes nothing). The warm-up (!kEmit): S~ kept at
// `warm` for list_warm_up, and a minimum per lane (run).
template <bool kEmit>
inline void fold_row(__m512i acc, const QuantizedRow& qrow, const PanelTerms& panel, __m512& run, float& min_s,
                     float& threshold, int32_t* cand, float* cand_val, int64_t cap, int64_t& count, float* warm) {
  const __m512 s = approximate_scores(acc, _mm512_set1_ps(qrow.scale), panel);
  if (!kEmit) {
    _mm512_store_ps(warm, s);
    run = _mm512_min_ps(s, run);
    return;
  }
  const __mmask16 m = _mm512_cmp_ps_mask(s, _mm512_set1_ps(threshold), _CMP_LE_OQ);
  if (__builtin_expect(m != 0, 0))
    list_passing(s, m, panel.ids, s, 0, panel.ids, qrow, min_s, threshold, cand, cand_val, cap, count);
}

// xq: the rows in blocks of kPrefilterRows, each interleaved: row r's group g is
// xq[(r / kPrefilterRows) * d4 * kPrefilterRows + g * kPrefilterRows + r % kPrefilterRows]. Without kEmit, row
// r's S~ of panel q go to warm[r] + 16 (q - q_begin). Up to kVnniScanRows rows: 16 accumulators, the code
// group and its broadcast operands fit the 32 registers, so the second block of 8 rows reads the panel from
// L1 in the same pass instead of from L2 in a second one.
template <int R, bool kEmit>
void scan_panels(const int32_t* xq, const QuantizedRow* qrows, const QuantizedCodes& codes, int64_t q_begin,
                 int64_t q_end, __m512 (&run)[R], float (&min_s)[R], float (&threshold)[R], int32_t* cand,
                 float* cand_val, int64_t cap, int64_t* count, VnniWarmScores* warm, int64_t prefetch_end) {
  static_assert(R >= 1 && R <= kVnniScanRows);
  const int64_t d4 = codes.d4;
  const int32_t* xq_high = xq + d4 * kPrefilterRows;  // rows 8 .. 15
  int32_t start[kVnniScanRows];  // the accumulators start at -correction: they end at r . q
  for (int r = 0; r < kVnniScanRows; ++r) start[r] = r < R ? -qrows[r].correction : 0;
  for (int64_t q = q_begin; q < q_end; ++q) {
    const uint8_t* b = codes.bytes + q * d4 * kQuantGroupBytes;
    prefetch_panels(codes, q + kPrefetchPanels, 1, prefetch_end);
    // Named accumulators: GCC keeps an array of inline-asm operands in memory.
    __m512i a0 = _mm512_set1_epi32(start[0]), a1 = _mm512_set1_epi32(start[1]), a2 = _mm512_set1_epi32(start[2]),
            a3 = _mm512_set1_epi32(start[3]), a4 = _mm512_set1_epi32(start[4]), a5 = _mm512_set1_epi32(start[5]),
            a6 = _mm512_set1_epi32(start[6]), a7 = _mm512_set1_epi32(start[7]), a8 = _mm512_set1_epi32(start[8]),
            a9 = _mm512_set1_epi32(start[9]), a10 = _mm512_set1_epi32(start[10]),
            a11 = _mm512_set1_epi32(start[11]), a12 = _mm512_set1_epi32(start[12]),
            a13 = _mm512_set1_epi32(start[13]), a14 = _mm512_set1_epi32(start[14]),
            a15 = _mm512_set1_epi32(start[15]);
    const int32_t* x = xq;
    const int32_t* y = xq_high;
    for (int64_t g = 0; g < d4; ++g, x += kPrefilterRows, y += kPrefilterRows) {
      const __m512i c = _mm512_load_si512(b + g * kQuantGroupBytes);
      dot4(a0, c, x);
      if constexpr (R > 1) dot4(a1, c, x + 1);
      if constexpr (R > 2) dot4(a2, c, x + 2);
      if constexpr (R > 3) dot4(a3, c, x + 3);
      if constexpr (R > 4) dot4(a4, c, x + 4);
      if constexpr (R > 5) dot4(a5, c, x + 5);
      if constexpr (R > 6) dot4(a6, c, x + 6);
      if constexpr (R > 7) dot4(a7, c, x + 7);
      if constexpr (R > 8) dot4(a8, c, y);
      if constexpr (R > 9) dot4(a9, c, y + 1);
      if constexpr (R > 10) dot4(a10, c, y + 2);
      if constexpr (R > 11) dot4(a11, c, y + 3);
      if constexpr (R > 12) dot4(a12, c, y + 4);
      if constexpr (R > 13) dot4(a13, c, y + 5);
      if constexpr (R > 14) dot4(a14, c, y + 6);
      if constexpr (R > 15) dot4(a15, c, y + 7);
    }
    const PanelTerms panel(codes, q);
    const __m512i accs[kVnniScanRows] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15};
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
      fold_row<kEmit>(accs[r], qrows[r], panel, run[r], min_s[r], threshold[r], cand + r * cap, cand_val + r * cap,
                      cap, count[r], kEmit ? nullptr : warm[r] + 16 * (q - q_begin));
  }
}

// Rows [0, R) (R <= kPrefilterRows, one block of xq) for the warm-up's panels: their S~ to warm[r] and
// min_s[r], the minimum of those and running[r]'s. A block at a time: each row's per-lane minimum stays in a
// register beside the accumulators (16 rows' would spill, and at K = 1024 the warm-up is the whole scan).
template <int R>
void warm_up(const int32_t* xq, const QuantizedRow* qrows, const QuantizedCodes& codes, int64_t q_begin,
             int64_t warmup, const float* running, VnniWarmScores* warm, float* min_s, int64_t* count,
             int64_t prefetch_end) {
  __m512 run[R];
  float unused_min[R], unused_threshold[R];  // the warm-up lists nothing
  for (int r = 0; r < R; ++r) run[r] = _mm512_loadu_ps(running + 16 * r);
  scan_panels<R, false>(xq, qrows, codes, q_begin, q_begin + warmup, run, unused_min, unused_threshold, nullptr,
                        nullptr, 0, count, warm, prefetch_end);
  for (int r = 0; r < R; ++r) min_s[r] = _mm512_reduce_min_ps(run[r]);
}

template <int R>
void scan(const int32_t* xq, const QuantizedRow* qrows, const QuantizedCodes& codes, int64_t q_begin, int64_t q_end,
          int64_t warmup, float* running, int32_t* cand, float* cand_val, int64_t cap, int64_t* count,
          int64_t prefetch_end) {
  constexpr int kFirstBlockRows = R < kPrefilterRows ? R : kPrefilterRows;
  float min_s[R], threshold[R];
  alignas(64) VnniWarmScores warm[R];
  // the minimum of the first panels first, so that they do not all pass
  warm_up<kFirstBlockRows>(xq, qrows, codes, q_begin, warmup, running, warm, min_s, count, prefetch_end);
  if constexpr (R > kPrefilterRows)
    warm_up<R - kPrefilterRows>(xq + codes.d4 * kPrefilterRows, qrows + kPrefilterRows, codes, q_begin, warmup,
                                running + 16 * kPrefilterRows, warm + kPrefilterRows, min_s + kPrefilterRows,
                                count + kPrefilterRows, 0);
  for (int r = 0; r < R; ++r) {
    if (warmup > 0)
      list_warm_up(warm[r], warmup, q_begin, min_s[r], qrows[r], cand + r * cap, cand_val + r * cap, cap, count[r]);
    threshold[r] = list_threshold(min_s[r], qrows[r]);
  }
  __m512 unused_run[R];
  scan_panels<R, true>(xq, qrows, codes, q_begin + warmup, q_end, unused_run, min_s, threshold, cand, cand_val, cap,
                       count, nullptr, prefetch_end);
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(running + 16 * r, _mm512_set1_ps(min_s[r]));
}

}  // namespace

void prefilter_scan_avx512(int rows, const int32_t* xq, const QuantizedRow* qrows, const QuantizedCodes& codes,
                           int64_t q_begin, int64_t q_end, int64_t warmup, float* running, int32_t* cand,
                           float* cand_val, int64_t cap, int64_t* count, int64_t prefetch_end) {
  switch (rows) {
#define FASTVQ_SCAN_CASE(R) \
  case R: return scan<R>(xq, qrows, codes, q_begin, q_end, warmup, running, cand, cand_val, cap, count, prefetch_end);
    FASTVQ_SCAN_CASE(1) FASTVQ_SCAN_CASE(2) FASTVQ_SCAN_CASE(3) FASTVQ_SCAN_CASE(4)
    FASTVQ_SCAN_CASE(5) FASTVQ_SCAN_CASE(6) FASTVQ_SCAN_CASE(7) FASTVQ_SCAN_CASE(8)
    FASTVQ_SCAN_CASE(9) FASTVQ_SCAN_CASE(10) FASTVQ_SCAN_CASE(11) FASTVQ_SCAN_CASE(12)
    FASTVQ_SCAN_CASE(13) FASTVQ_SCAN_CASE(14) FASTVQ_SCAN_CASE(15)
#undef FASTVQ_SCAN_CASE
    default: return scan<16>(xq, qrows, codes, q_begin, q_end, warmup, running, cand, cand_val, cap, count,
                             prefetch_end);
  }
}

}  // namespace fastvq::cpu

// ---- the codes' and rows' quantization (prefilter.h) ----
namespace fastvq::cpu {
namespace {

__mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << remaining) - 1);
}

}  // namespace

void prefilter_quantize_panel_avx512(const float* panel, int64_t d, int64_t d4, uint8_t* bytes, float* scale,
                                     double* norms) {
  __m512 largest = _mm512_setzero_ps();
  for (int64_t p = 0; p < d; ++p) largest = _mm512_max_ps(largest, _mm512_abs_ps(_mm512_load_ps(panel + p * 16)));
  const __mmask16 zero = _mm512_cmp_ps_mask(largest, _mm512_setzero_ps(), _CMP_EQ_OQ);
  const __m512 s = _mm512_mask_blend_ps(zero, _mm512_div_ps(largest, _mm512_set1_ps(127.0f)), _mm512_set1_ps(1.0f));
  _mm512_storeu_ps(scale, s);
  const __m512 inverse = _mm512_div_ps(_mm512_set1_ps(1.0f), s);
  const __m512d s_lo = _mm512_cvtps_pd(_mm512_castps512_ps256(s));
  const __m512d s_hi = _mm512_cvtps_pd(_mm512_castps512_ps256(_mm512_shuffle_f32x4(s, s, 0x4E)));
  const __m512i low = _mm512_set1_epi32(-127), high = _mm512_set1_epi32(127), offset = _mm512_set1_epi32(128);
  __m512d sums[3][2];
  for (auto& pair : sums) pair[0] = pair[1] = _mm512_setzero_pd();
  for (int64_t g = 0; g < d4; ++g) {
    __m128i b[4];
    for (int k = 0; k < 4; ++k) {
      const int64_t p = 4 * g + k;
      if (p >= d) {
        b[k] = _mm_set1_epi8(static_cast<char>(128));  // level 0 past d
        continue;
      }
      const __m512 v = _mm512_load_ps(panel + p * 16);
      const __m512i level = _mm512_max_epi32(
          low, _mm512_min_epi32(high, _mm512_cvt_roundps_epi32(_mm512_mul_ps(v, inverse),
                                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
      b[k] = _mm512_cvtepi32_epi8(_mm512_add_epi32(level, offset));
      // In double, exactly: v, s r and v - s r of each code's entry.
      const __m256 halves[2] = {_mm512_castps512_ps256(v), _mm512_castps512_ps256(_mm512_shuffle_f32x4(v, v, 0x4E))};
      const __m256i level_halves[2] = {_mm512_castsi512_si256(level), _mm512_extracti64x4_epi64(level, 1)};
      for (int h = 0; h < 2; ++h) {
        const __m512d vd = _mm512_cvtps_pd(halves[h]);
        const __m512d rebuilt = _mm512_mul_pd(h ? s_hi : s_lo, _mm512_cvtepi32_pd(level_halves[h]));
        const __m512d error = _mm512_sub_pd(vd, rebuilt);
        sums[0][h] = _mm512_fmadd_pd(vd, vd, sums[0][h]);
        sums[1][h] = _mm512_fmadd_pd(error, error, sums[1][h]);
        sums[2][h] = _mm512_fmadd_pd(rebuilt, rebuilt, sums[2][h]);
      }
    }
    // bytes[g][j][k] = b[k][j]: interleave the four 16-byte rows into 16 groups of 4
    const __m128i b01_lo = _mm_unpacklo_epi8(b[0], b[1]), b01_hi = _mm_unpackhi_epi8(b[0], b[1]);
    const __m128i b23_lo = _mm_unpacklo_epi8(b[2], b[3]), b23_hi = _mm_unpackhi_epi8(b[2], b[3]);
    __m128i* out = reinterpret_cast<__m128i*>(bytes + g * 64);
    _mm_storeu_si128(out + 0, _mm_unpacklo_epi16(b01_lo, b23_lo));
    _mm_storeu_si128(out + 1, _mm_unpackhi_epi16(b01_lo, b23_lo));
    _mm_storeu_si128(out + 2, _mm_unpacklo_epi16(b01_hi, b23_hi));
    _mm_storeu_si128(out + 3, _mm_unpackhi_epi16(b01_hi, b23_hi));
  }
  for (int k = 0; k < 3; ++k) {
    _mm512_storeu_pd(norms + 16 * k, sums[k][0]);
    _mm512_storeu_pd(norms + 16 * k + 8, sums[k][1]);
  }
}

float prefilter_max_abs_avx512(const float* x, const float* centre, int64_t d) {
  __m512 largest = _mm512_setzero_ps();
  for (int64_t p = 0; p < d; p += 16) {
    const __mmask16 m = tail_mask(d - p);
    const __m512 v = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + p), _mm512_maskz_loadu_ps(m, centre + p));
    largest = _mm512_max_ps(largest, _mm512_abs_ps(v));
  }
  return _mm512_reduce_max_ps(largest);
}

int32_t prefilter_levels_avx512(const float* x, const float* centre, int64_t d, int64_t d4, float scale, int32_t* xq,
                                int64_t stride, double* sums) {
  const __m512 inverse = _mm512_set1_ps(1.0f / scale);
  const __m512d scale_d = _mm512_set1_pd(scale);
  const __m512i low = _mm512_set1_epi32(-127), high = _mm512_set1_epi32(127);
  __m512d norm_sq = _mm512_setzero_pd(), error_sq = norm_sq, quant_sq = norm_sq;
  __m512i level_sum = _mm512_setzero_si512();
  alignas(16) int8_t bytes[16];
  for (int64_t p = 0; p < 4 * d4; p += 16) {
    const __mmask16 m = tail_mask(d - p);  // zero levels past d
    const __m512 v = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + p), _mm512_maskz_loadu_ps(m, centre + p));
    const __m512i level = _mm512_max_epi32(
        low, _mm512_min_epi32(high, _mm512_cvt_roundps_epi32(_mm512_mul_ps(v, inverse),
                                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    level_sum = _mm512_add_epi32(level_sum, level);
    _mm_store_si128(reinterpret_cast<__m128i*>(bytes), _mm512_cvtepi32_epi8(level));
    for (int64_t g = p / 4; g < d4 && g < p / 4 + 4; ++g)
      __builtin_memcpy(xq + g * stride, bytes + 4 * (g - p / 4), 4);
    // In double, exactly: the error v - s r of each entry, and the three squared norms.
    const __m256 halves[2] = {_mm512_castps512_ps256(v), _mm512_castps512_ps256(_mm512_shuffle_f32x4(v, v, 0x4E))};
    const __m256i level_halves[2] = {_mm512_castsi512_si256(level), _mm512_extracti64x4_epi64(level, 1)};
    for (int h = 0; h < 2; ++h) {
      const __m512d vd = _mm512_cvtps_pd(halves[h]);
      const __m512d rebuilt = _mm512_mul_pd(scale_d, _mm512_cvtepi32_pd(level_halves[h]));
      const __m512d error = _mm512_sub_pd(vd, rebuilt);
      norm_sq = _mm512_fmadd_pd(vd, vd, norm_sq);
      error_sq = _mm512_fmadd_pd(error, error, error_sq);
      quant_sq = _mm512_fmadd_pd(rebuilt, rebuilt, quant_sq);
    }
  }
  sums[0] = _mm512_reduce_add_pd(norm_sq);
  sums[1] = _mm512_reduce_add_pd(error_sq);
  sums[2] = _mm512_reduce_add_pd(quant_sq);
  return _mm512_reduce_add_epi32(level_sum);
}

}  // namespace fastvq::cpu

// ---- the int8 products' speed (int8_speed.h) ----
namespace fastvq::cpu {

int32_t int8_dot_chains_avx512(int64_t iters, int32_t seed) {
  static_assert(kInt8DotChains == 16, "the chains below are written out for 16");
  const __m512i ones = _mm512_set1_epi8(1), b = _mm512_set1_epi32(seed);
  // Named, not an array: GCC keeps an array of inline-asm operands in memory.
  __m512i c0 = _mm512_set1_epi32(0), c1 = _mm512_set1_epi32(1), c2 = _mm512_set1_epi32(2), c3 = _mm512_set1_epi32(3),
          c4 = _mm512_set1_epi32(4), c5 = _mm512_set1_epi32(5), c6 = _mm512_set1_epi32(6), c7 = _mm512_set1_epi32(7),
          c8 = _mm512_set1_epi32(8), c9 = _mm512_set1_epi32(9), c10 = _mm512_set1_epi32(10),
          c11 = _mm512_set1_epi32(11), c12 = _mm512_set1_epi32(12), c13 = _mm512_set1_epi32(13),
          c14 = _mm512_set1_epi32(14), c15 = _mm512_set1_epi32(15);
  for (int64_t i = 0; i < iters; ++i) {
#define FASTVQ_DOT(c) __asm__("vpdpbusd %2, %1, %0" : "+v"(c) : "v"(ones), "v"(b))
    FASTVQ_DOT(c0); FASTVQ_DOT(c1); FASTVQ_DOT(c2); FASTVQ_DOT(c3); FASTVQ_DOT(c4); FASTVQ_DOT(c5);
    FASTVQ_DOT(c6); FASTVQ_DOT(c7); FASTVQ_DOT(c8); FASTVQ_DOT(c9); FASTVQ_DOT(c10); FASTVQ_DOT(c11);
    FASTVQ_DOT(c12); FASTVQ_DOT(c13); FASTVQ_DOT(c14); FASTVQ_DOT(c15);
#undef FASTVQ_DOT
  }
  const __m512i total = _mm512_add_epi32(
      _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3)),
                       _mm512_add_epi32(_mm512_add_epi32(c4, c5), _mm512_add_epi32(c6, c7))),
      _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c8, c9), _mm512_add_epi32(c10, c11)),
                       _mm512_add_epi32(_mm512_add_epi32(c12, c13), _mm512_add_epi32(c14, c15))));
  return _mm512_reduce_add_epi32(total);
}

}  // namespace fastvq::cpu
