// The int8 prefilter's scan on AMX-INT8 tiles (prefilter.h: prefilter_scan_amx). The only file compiled with
// -mamx-tile -mamx-int8 (built where the compiler has them); called through nearest_code_prefilter.cpp only
// after the CPU reports AMX-INT8 and Linux grants the tile state. Free of the C++ standard library (see
// kernels.h).
//
// Work comes in panels, each against every row: tiles 4 and 5 hold the two halves' int8 levels (16 rows x 64
// dimensions), the panel's bytes for the same 64 dimensions go to tile 6 (even panels) or 7 (odd; the panels'
// own layout: 16 groups of 16 codes x 4 bytes), and its accumulators are tiles 0 and 1 (even) or 2 and 3
// (odd), loaded with the rows' -correction (TDPBSUD, 16 x 16 x 64 each). Consecutive panels share no tile, so
// the tile unit multiplies panel q while panel q - 1 is stored and the vector units fold the panels before
// into the rows' minima and candidates, two panels a row at a time (fold_listing). Against units of one
// half x two panels sharing tiles 6 and 7, with a minimum per lane: a k-means iteration's hinted search
// (32768 x 1024 x 64, same process, medians of 20-40) 8.92 -> 7.47, 9.56 -> 8.21, 8.63 -> 6.99 ms.
#include <immintrin.h>

#include <cstdint>

#include "cpu/prefilter.h"
#include "cpu/prefilter_fold.h"

namespace fastvq::cpu {
namespace {

// One row's kept warm-up scores: kAmxWarmupPanels panels of 16.
using AmxWarmScores = float[kAmxWarmupPanels * 16];

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The rows' dot products with one panel, [row][code], row 16 h + r from accumulator h.
using PanelDots = int32_t[kAmxRows][16];

// Panel bytes b (its 64-dimension chunks) times the rows' levels into accumulators ACC0 (rows 0-15) and ACC1
// (16-31, when halves == 2), started from `start`, through bytes tile BYTES; chunks > 1: the levels are
// loaded chunk by chunk. (GCC's tile intrinsics paste their tile numbers into the asm: macros, not templates.)
#define FASTVQ_MULTIPLY_PANEL(ACC0, ACC1, BYTES)                                 \
  do {                                                                          \
    _tile_loadd(ACC0, start[0], 64);                                            \
    if (halves == 2) _tile_loadd(ACC1, start[16], 64);                          \
    for (int64_t c = 0; c < chunks; ++c) {                                      \
      _tile_loadd(BYTES, b + c * kAmxChunkBytes, kQuantGroupBytes);             \
      if (chunks > 1) {                                                         \
        _tile_loadd(4, xq + c * 16, row_words * 4);                             \
        if (halves == 2) _tile_loadd(5, xq + 16 * row_words + c * 16, row_words * 4); \
      }                                                                         \
      _tile_dpbsud(ACC0, 4, BYTES);                                             \
      if (halves == 2) _tile_dpbsud(ACC1, 5, BYTES);                            \
    }                                                                           \
  } while (0)

#define FASTVQ_STORE_PANEL(ACC0, ACC1, DOTS)            \
  do {                                                  \
    _tile_stored(ACC0, (DOTS)[0], 64);                  \
    if (halves == 2) _tile_stored(ACC1, (DOTS)[16], 64); \
  } while (0)

// The listing fold of panels `first` and `second` (when kPair): rows [0, rows), whose dot products are
// dots0[r] and dots1[r]. A row's minimum S~ is one float (min_s[r], list_threshold of it in threshold[r]),
// changed only where a code passes the threshold -- as any code below the minimum does -- so the common case
// is S~ and one compare a panel. (This alone, against a minimum per lane reduced every 4 panels: 7.40 -> 6.64,
// 8.19 -> 7.32, 9.80 -> 8.51 ms for the search above; the same codes listed or fewer.)
template <bool kPair>
void fold_listing(const PanelDots& dots0, const PanelDots& dots1, int rows, const QuantizedRow* qrows,
                  const PanelTerms& first, const PanelTerms& second, float* min_s, float* threshold, int32_t* cand,
                  float* cand_val, int64_t cap, int64_t* count) {
  for (int r = 0; r < rows; ++r) {
    const QuantizedRow& qrow = qrows[r];
    const __m512 row_scale = _mm512_set1_ps(qrow.scale);
    const __m512 s0 = approximate_scores(_mm512_load_si512(dots0[r]), row_scale, first);
    const __m512 s1 = kPair ? approximate_scores(_mm512_load_si512(dots1[r]), row_scale, second) : s0;
    const __m512 limit = _mm512_set1_ps(threshold[r]);
    const __mmask16 m0 = _mm512_cmp_ps_mask(s0, limit, _CMP_LE_OQ);
    const __mmask16 m1 = kPair ? _mm512_cmp_ps_mask(s1, limit, _CMP_LE_OQ) : __mmask16{0};
    if (__builtin_expect((m0 | m1) != 0, 0))
      list_passing(s0, m0, first.ids, s1, m1, second.ids, qrow, min_s[r], threshold[r], cand + r * cap,
                   cand_val + r * cap, cap, count[r]);
  }
}

// The warm-up's fold: each panel's S~ kept (warm[r] + 16 w for panel q_begin + w), the minimum per lane.
template <bool kPair>
void fold_warm_up(const PanelDots& dots0, const PanelDots& dots1, int rows, const QuantizedRow* qrows,
                  const PanelTerms& first, const PanelTerms& second, int64_t w, AmxWarmScores* warm, float* running) {
  for (int r = 0; r < rows; ++r) {
    const __m512 row_scale = _mm512_set1_ps(qrows[r].scale);
    const __m512 s0 = approximate_scores(_mm512_load_si512(dots0[r]), row_scale, first);
    const __m512 s1 = kPair ? approximate_scores(_mm512_load_si512(dots1[r]), row_scale, second) : s0;
    _mm512_store_ps(warm[r] + 16 * w, s0);
    if (kPair) _mm512_store_ps(warm[r] + 16 * (w + 1), s1);
    _mm512_storeu_ps(running + 16 * r, _mm512_min_ps(s1, _mm512_min_ps(s0, _mm512_loadu_ps(running + 16 * r))));
  }
}

}  // namespace

void prefilter_scan_amx(int rows, const int32_t* xq, int64_t row_words, const QuantizedRow* qrows,
                        const QuantizedCodes& codes, int64_t q_begin, int64_t q_end, int64_t warmup, float* running,
                        int32_t* cand, float* cand_val, int64_t cap, int64_t* count, int64_t prefetch_end) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
  const int64_t chunks = row_words / 16, panel_bytes = codes.d4 * kQuantGroupBytes;
  const int halves = rows > 16 ? 2 : 1;
  alignas(64) PanelDots dots[2];          // [panel parity]
  alignas(64) PanelDots start;            // the accumulators start at -correction
  alignas(64) AmxWarmScores warm[kAmxRows];  // the warm-up's S~ per row (list_warm_up)
  float min_s[kAmxRows], threshold[kAmxRows];  // listing: each row's minimum S~ and list_threshold of it
  for (int r = 0; r < kAmxRows; ++r)
    _mm512_store_si512(start[r], _mm512_set1_epi32(r < rows ? -qrows[r].correction : 0));
  if (chunks == 1) {  // the rows' levels stay in tiles 4 and 5 for the whole call
    _tile_loadd(4, xq, row_words * 4);
    if (halves == 2) _tile_loadd(5, xq + 16 * row_words, row_words * 4);
  }
  const auto issue = [&](int64_t q) {
    prefetch_panels(codes, q + kPrefetchPanels, 1, prefetch_end);
    const uint8_t* b = codes.bytes + q * panel_bytes;
    if (q % 2 == 0) FASTVQ_MULTIPLY_PANEL(0, 1, 6);
    else FASTVQ_MULTIPLY_PANEL(2, 3, 7);
  };
  const auto store = [&](int64_t q) {
    if (q % 2 == 0) FASTVQ_STORE_PANEL(0, 1, dots[0]);
    else FASTVQ_STORE_PANEL(2, 3, dots[1]);
  };
  // Panels q (and q + 1 when pair), stored.
  const auto fold = [&](int64_t q, bool pair, bool emit) {
    const PanelDots &d0 = dots[q % 2], &d1 = dots[(q + 1) % 2];
    const PanelTerms first(codes, q), second(codes, pair ? q + 1 : q);
    if (emit) {
      if (pair) fold_listing<true>(d0, d1, rows, qrows, first, second, min_s, threshold, cand, cand_val, cap, count);
      else fold_listing<false>(d0, d0, rows, qrows, first, first, min_s, threshold, cand, cand_val, cap, count);
    } else {
      if (pair) fold_warm_up<true>(d0, d1, rows, qrows, first, second, q - q_begin, warm, running);
      else fold_warm_up<false>(d0, d0, rows, qrows, first, first, q - q_begin, warm, running);
    }
  };
  // Panels [a, b) pipelined: issue panel q, store panel q - 1, fold panels q - 2 and q - 1 as a pair.
  const auto sweep = [&](int64_t a, int64_t b, bool emit) {
    for (int64_t q = a; q < b; ++q) {
      issue(q);
      if (q == a) continue;
      store(q - 1);
      if ((q - a) % 2 == 0) fold(q - 2, true, emit);
    }
    if (b > a) {
      store(b - 1);
      if ((b - a) % 2 == 0) fold(b - 2, true, emit);
      else fold(b - 1, false, emit);
    }
  };
  if (warmup > 0) sweep(q_begin, q_begin + warmup, false);
  for (int r = 0; r < rows; ++r) {
    min_s[r] = _mm512_reduce_min_ps(_mm512_loadu_ps(running + 16 * r));
    if (warmup > 0)
      list_warm_up(warm[r], warmup, q_begin, min_s[r], qrows[r], cand + r * cap, cand_val + r * cap, cap, count[r]);
    threshold[r] = list_threshold(min_s[r], qrows[r]);
  }
  sweep(q_begin + warmup, q_end, true);
  for (int r = 0; r < rows; ++r) _mm512_storeu_ps(running + 16 * r, _mm512_set1_ps(min_s[r]));
  _tile_release();
}
#undef FASTVQ_MULTIPLY_PANEL
#undef FASTVQ_STORE_PANEL

}  // namespace fastvq::cpu
