// The int8 prefilter of nearest_code (AVX-512 VNNI, AMX-INT8 or AVX2): an exact search that reads the codes as
// bytes.
//
// Each code of the pack (pack_codebook.h: panel values e'' = -2 (e - c)) is also kept as int8 with a
// scale per code, and each row x' = x - c is quantized the same way per row. One int8
// dot per (row, code) gives an approximate score S~ = ||e'||^2 + s_x s_e (r . q); the float32 score
// S that the search kernels compute (norm, then one FMA per p) lies within a bound R(e) of it
// (prefilter_codes.cpp derives it). So the code the full search picks, and every code tied with it,
// has S~ - R <= min (S~ + R). The scan lists every code within a row-wide spread of the smallest S~
// (a superset of those), the driver keeps those with S~ - R <= the listed codes' min (S~ + R), and only
// they are scored again with the search kernels' float32 arithmetic. Result: bitwise the full search's
// (indices, sqdist), reading a quarter of the bytes and doing the bulk of the products 64 to an instruction.
//
// A row whose candidates overflow their buffer (near-duplicate codes, a constant codebook), or inputs
// outside the bound's assumptions, make the call run the full search instead; nothing is approximate.
//
// This header is included by the kernels' files (compiled with their ISA flags): declarations and constants
// only (see kernels.h).
#pragma once

#include <cstdint>

namespace fastvq::cpu {

// The bound's rounding constants (prefilter_codes.cpp): float32's unit roundoff, and the relative slack
// a rounded-up term carries for the double arithmetic before it, and the spread on top of its terms.
constexpr double kUnitRoundoff = 1.0 / (1 << 24);
constexpr double kRoundUpSlack = 1.0 / (1 << 20);
constexpr double kSpreadSlack = 1.0 / (1 << 18);

// The panels a scan's warm-up covers (its S~ are kept on the stack, not computed twice), per scan: AMX (its
// 32 rows' buffers), VNNI and AVX2 (PrefilterKernels::warmup_panels; why these: nearest_code_prefilter.cpp).
// Each scan file keeps its rows' warm-up scores in a buffer of its own length.
constexpr int64_t kAmxWarmupPanels = 16;
constexpr int64_t kVnniWarmupPanels = 64;
constexpr int64_t kAvx2WarmupPanels = 48;
// How far ahead a scan of codes streamed from memory prefetches (prefetch_end): 8 panels (8 KiB at
// d = 64), every line. Same process, each call after a faiss and a torch.cdist call (the bench's
// alternation), K = 65536, d = 64, medians of 120: 16 rows (AMX) 543 -> 474 and 621 -> 547 us; 1 row
// (VNNI) 285 -> 245 and 307 -> 270 us; 2 rows 212 -> 172 us. 16 and 32 panels ahead gained less; one
// line per panel or per 4 lines, less again.
constexpr int64_t kPrefetchPanels = 8;
// Bytes of one panel group: 16 codes x 4 consecutive dimensions, code-major (vpdpbusd's layout).
constexpr int kQuantGroupBytes = 64;
// d above this could overflow the int32 dot's exact float conversion (|r . q| <= 127^2 d < 2^24).
constexpr int64_t kPrefilterMaxDim = 1024;
// Rows interleaved in one block of the rows' levels (RowLayout::offset). One scan call takes one block (the
// AVX2 scan, 4 rows at a time) or two (the VNNI scan, kVnniScanRows: 16 accumulators and the panel's bytes in
// registers); the AMX scan takes two 16-row tiles. The driver's groups are kAmxRows rows.
constexpr int kPrefilterRows = 8;
constexpr int kVnniScanRows = 2 * kPrefilterRows;
constexpr int kAmxRows = 32;
// The AVX2 scan's rows' levels fill [-64, 64]: its vpmaddubsw sums two byte products to int16, which
// saturates unless 2 * 255 * |r| <= 32767 (prefilter_avx2.cpp).
constexpr int32_t kAvx2MaxLevel = 64;
// The AMX scan's tiles read whole 64-dimension chunks: a panel's last chunk may run past its d4 groups
// (those bytes meet zero levels of x) and, for the last panel, past the codes: this many bytes of slack.
constexpr int64_t kAmxChunkBytes = 1024;

// The int8 copy of a packed codebook (built once per pack: prefilter_codes.cpp).
//   bytes[q][g][j][b] = q_{16q+j, 4g+b} + 128 (unsigned: vpdpbusd's first operand), 128 past d;
//   scale[16q+j]      = s_e = max_p |e''_p| / 127 (rounded to float32), |q| <= 127;
//   norm[16q+j]       = the pack's ||e - c||^2, NaN for a code that can never win (non-finite
//                        entries, or padding past K): no comparison lets NaN through;
//   error_norm[16q+j] = ||e'' - s_e q||, quant_norm[16q+j] = ||s_e q|| (rounded up; 0 for those codes):
//                        the code's terms of the bound (prefilter_codes.cpp).
struct QuantizedCodes {
  int64_t npanels = 0, d = 0, d4 = 0;  // d4 = ceil(d / 4) groups of 4 dimensions
  uint8_t* bytes = nullptr;
  float* scale = nullptr;
  float* norm = nullptr;
  float* error_norm = nullptr;
  float* quant_norm = nullptr;
  // Over the codes that can win, for the bound: max ||e''||, max ||e'' - s_e q||, max ||s_e q||,
  // max ||e - c||^2, and the smallest and largest scale.
  double max_panel_norm = 0, max_error_norm = 0, max_quant_norm = 0, max_norm = 0;
  double min_scale = 0, max_scale = 0;
  bool any_code = false;  // some code can win
  size_t nbytes = 0;
  QuantizedCodes() = default;
  ~QuantizedCodes();
  QuantizedCodes(const QuantizedCodes&) = delete;
  QuantizedCodes& operator=(const QuantizedCodes&) = delete;
};

// One row of x quantized for the scan (its int8 levels r, 4 to an int32: r_{4g..4g+3}), its scale s_x,
// the offset correction 128 * sum(r) (the codes are stored + 128; the scans start their accumulators at
// -correction, so they hold r . q), and its terms of the bound: code e's S~ is within
// R(e) = alpha * error_norm[e] + beta * quant_norm[e] + rho of the float32 kernels' score (alpha = ||x - c||,
// beta = ||x - c - s_x r||, rho the rest and every float32 rounding; prefilter_codes.cpp derives them).
// spread bounds R(e) + R(e') + roundings over any two codes: a code whose L = S~ - R is within
// min U = min (S~ + R) has S~ <= min S~ + spread, which is all the scan tests.
struct QuantizedRow {
  float scale = 0.0f;
  int32_t correction = 0;
  float alpha = 0.0f, beta = 0.0f, rho = 0.0f, spread = 0.0f;
};

// Scan panels [q_begin, q_end) for `rows` (1..PrefilterKernels::scan_rows) quantized rows, in blocks of
// kPrefilterRows interleaved: row r's 4-byte group g is xq[(r / kPrefilterRows) d4 kPrefilterRows +
// g kPrefilterRows + r % kPrefilterRows] (RowLayout::offset). running[r * 16 .. r * 16 + 15] is row r's
// running minimum of S~ (in: per lane, +inf to start; out: the row's minimum in every lane), and every code
// with S~ <= (running minimum so far) +
// spread (added rounding up) is appended, in increasing order, with its S~, to cand / cand_val + r * cap
// (count[r] entries so far): the float32 search's choice, and any code tied with it, is listed
// (qrow.spread). The driver then keeps the listed codes whose L is within the listed codes' smallest U.
// The first `warmup` (<= the scan's k*WarmupPanels) panels are scanned first for
// the minimum alone, so that they do not all pass, and their codes are listed against it after. A row that
// would pass `cap` gets count[r] = cap + 1 and no more candidates (the driver searches it in full). prefetch_end > q_begin: the panels up to it come from memory, read once by this scan
// and those after it in order (a call of few rows), so the scan prefetches kPrefetchPanels ahead, up to
// it; 0: none (the codes are in cache: other rows read them just before).
using PrefilterScanFn = void (*)(int rows, const int32_t* xq, const QuantizedRow* qrows, const QuantizedCodes& codes,
                                 int64_t q_begin, int64_t q_end, int64_t warmup, float* running, int32_t* cand,
                                 float* cand_val, int64_t cap, int64_t* count, int64_t prefetch_end);
using PrefilterRescoreFn = void (*)(const float* xc, int64_t d, const float* codebook, const float* centre,
                                    const float* norms, const int32_t* rows, const int32_t* codes, int64_t count,
                                    float* best_val, int64_t* best_idx);
using PrefilterQuantizePanelFn = void (*)(const float* panel, int64_t d, int64_t d4, uint8_t* bytes, float* scale,
                                          double* norms);
using PrefilterMaxAbsFn = float (*)(const float* x, const float* centre, int64_t d);
using PrefilterLevelsFn = int32_t (*)(const float* x, const float* centre, int64_t d, int64_t d4, float scale,
                                      int32_t* xq, int64_t stride, double* sums);

// The kernels of one scan (AVX-512 VNNI, prefilter_avx512.cpp; AVX2, prefilter_avx2.cpp), taken once per
// call: rows are scanned by the kernel set that quantized them. (The AMX scan reads the VNNI set's rows.)
//   quantize_panel: one panel of the pack (16 codes: panel[p * 16 + j]) quantized: bytes (d4 groups of 64,
//     the layout of QuantizedCodes::bytes), scale[j] = max_p |e_jp| / 127 (1 for a zero code), and in double
//     the squared norms[16 k + j] of e, of e - s q and of s q (k = 0, 1, 2). Codes with non-finite entries get
//     meaningless values here; the caller overwrites them. Every set makes the same bytes.
//   max_abs: max_p |x_p - c_p| over d entries.
//   levels: r_p = round((x_p - c_p) / scale), clamped to [-max_level, max_level] and 0 past d, 4 to an int32
//     at xq[g * stride] (g < d4); returns sum_p r_p, and in double sums[0..2] = ||x - c||^2,
//     ||x - c - scale r||^2 and ||scale r||^2.
//   scan, rescore: as above (PrefilterScanFn, PrefilterRescoreFn).
struct PrefilterKernels {
  const char* name;       // "vnni", "avx2"
  int32_t max_level;      // the rows' levels fill [-max_level, max_level]; the codes' always [-127, 127]
  int64_t warmup_panels;  // panels a row's scan takes for its minimum alone first (at most what the scan keeps)
  int scan_rows;          // the most rows one scan call takes (kPrefilterRows or kVnniScanRows)
  PrefilterQuantizePanelFn quantize_panel;
  PrefilterMaxAbsFn max_abs;
  PrefilterLevelsFn levels;
  PrefilterScanFn scan;
  PrefilterRescoreFn rescore;
};

#ifdef FASTVQ_HAVE_AVX2_KERNEL
// The float32 score of each listed (row, code) pair, row r's centred values at xc + r * d, the code's
// from its codebook row (the pack's -2 (e - c), rebuilt bitwise): the search kernels' value (norm, then
// one FMA per p), merged into best_*[row] in list order as they do (strictly smaller replaces; each
// row's codes are listed in increasing order). Every scan's (it is scalar arithmetic).
void prefilter_rescore_avx2(const float* xc, int64_t d, const float* codebook, const float* centre,
                            const float* norms, const int32_t* rows, const int32_t* codes, int64_t count,
                            float* best_val, int64_t* best_idx);
// Each row's terms of the bound (prefilter_codes.cpp derives them) from its squared norms in double, for
// `count` <= 8 rows, 4 to a vector: ||x'||^2, ||x' - x^||^2 and ||x^||^2 in norm_sq[i], error_sq[i],
// quant_sq[i], over the codes' maxima. Writes alpha, beta, rho and spread (rounded up to float32) of
// qrows[0 .. count); returns the mask of the rows whose four terms are finite. Every scan's.
unsigned prefilter_row_bounds_avx2(const double* norm_sq, const double* error_sq, const double* quant_sq, int count,
                                   const QuantizedCodes& codes, QuantizedRow* qrows);
void prefilter_quantize_panel_avx2(const float* panel, int64_t d, int64_t d4, uint8_t* bytes, float* scale,
                                   double* norms);
float prefilter_max_abs_avx2(const float* x, const float* centre, int64_t d);
int32_t prefilter_levels_avx2(const float* x, const float* centre, int64_t d, int64_t d4, float scale, int32_t* xq,
                              int64_t stride, double* sums);
void prefilter_scan_avx2(int rows, const int32_t* xq, const QuantizedRow* qrows, const QuantizedCodes& codes,
                         int64_t q_begin, int64_t q_end, int64_t warmup, float* running, int32_t* cand,
                         float* cand_val, int64_t cap, int64_t* count, int64_t prefetch_end);
#endif
#ifdef FASTVQ_HAVE_AVX512_VNNI_KERNEL
void prefilter_quantize_panel_avx512(const float* panel, int64_t d, int64_t d4, uint8_t* bytes, float* scale,
                                     double* norms);
float prefilter_max_abs_avx512(const float* x, const float* centre, int64_t d);
int32_t prefilter_levels_avx512(const float* x, const float* centre, int64_t d, int64_t d4, float scale, int32_t* xq,
                                int64_t stride, double* sums);
void prefilter_scan_avx512(int rows, const int32_t* xq, const QuantizedRow* qrows, const QuantizedCodes& codes,
                           int64_t q_begin, int64_t q_end, int64_t warmup, float* running, int32_t* cand,
                           float* cand_val, int64_t cap, int64_t* count, int64_t prefetch_end);
// The same scan on AMX-INT8 tiles (prefilter_amx.cpp), for up to kAmxRows rows: xq row-major here,
// row r's 4-byte groups at xq + r * row_words (row_words a multiple of 16, zero past d4; rows past
// `rows` zero). The caller has requested the tile state from the OS (amx_ready in the driver).
void prefilter_scan_amx(int rows, const int32_t* xq, int64_t row_words, const QuantizedRow* qrows,
                        const QuantizedCodes& codes, int64_t q_begin, int64_t q_end, int64_t warmup, float* running,
                        int32_t* cand, float* cand_val, int64_t cap, int64_t* count, int64_t prefetch_end);
#endif

}  // namespace fastvq::cpu
