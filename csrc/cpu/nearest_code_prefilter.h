// nearest_code through the int8 prefilter (prefilter.h), its switch and its reasons.
// Source: nearest_code_prefilter.cpp.
#pragma once

#include <cstdint>
#include <string>

#include "cpu/pack_codebook.h"
#include "cpu/search_common.h"

namespace fastvq::cpu {

// Below these the float32 search alone is as fast or faster ("auto"), per scan: each row's fixed costs
// (quantize, warm-up, the candidates' float32 scores) need enough codes to pay back, and at small d the
// scan's per-panel epilogue outweighs its int8 products. A call of few rows splits the codes across threads,
// and the fixed costs per call (quantize, per-chunk minima, the candidates' float32 scores) need more codes.
struct AutoThresholds {
  int64_t min_dim, min_codes, min_code_floats;  // K >= min_codes and K d >= min_code_floats, d >= min_dim
  int64_t few_rows_min_code_floats;             // K d for n < kFewRows
  int64_t some_rows_min_code_floats;            // K d for n < kSomeRows
};
constexpr int64_t kFewRows = 16, kSomeRows = 64;
// The VNNI scan, measured on a 2-core Xeon (model 207), 2 threads: K d = 2^16 (1024 x 64) 0.91x, 2^17
// (2048 x 64, 1024 x 128, 4096 x 32) 1.08-1.16x; 512 x 256 0.98x; d = 16 at K = 16384 1.03x, d = 24 1.24x.
// Few rows, cached pack, float32 time over prefilter time: K d = 2^16 (1024 x 64) 0.71-0.74 at 1-16 rows,
// 1.21 at 64; 2^17 (4096 x 32) 0.79 at 1 row, 1.27 at 16; 2^18 (4096 x 64, 2048 x 128) 0.89-1.05 at 1-4
// rows, 1.65-1.94 at 16; 2^20 2.1-4.6 at 1 row.
constexpr AutoThresholds kVnniAuto{24, 1024, int64_t{1} << 17, int64_t{1} << 18, int64_t{1} << 17};
// The VNNI scan where int8 products run at least kWideInt8Ratio times as fast as fp32 ones (int8_speed.h: 4.0
// on a 2-core AMD EPYC, Zen 5, family 26). There, 2 threads, same process, float32 time over prefilter time:
// 32768 rows, K d = 2^16: 1024 x 64 1.29-1.67, 2048 x 32 1.19, 512 x 128 1.24-1.25, 256 x 256 0.96, 1024 x 48
// 1.12; 2^15: 512 x 64 1.05, 1024 x 32 0.96, 256 x 128 1.02; 1024 x 64 at 4096, 1024 and 256 rows 1.24-1.38;
// hinted (k-means) 1.57. 63-64 rows at 2^16 1.39-1.40; 1-16 rows at 2^16-2^17 0.99-1.08 (cached pack, warm).
constexpr double kWideInt8Ratio = 3.0;
constexpr AutoThresholds kVnniWideAuto{24, 512, int64_t{1} << 16, int64_t{1} << 18, int64_t{1} << 16};
// The AVX2 scan, measured on a 2-core AMD EPYC (Zen 3, AVX2 only), 2 threads, same process, cached pack,
// float32 time over prefilter time. 8192 rows: K = 1024: d = 32 0.97, 48 1.08, 64 1.15, 128 1.31; K = 2048:
// d = 16 1.03, 24 1.13, 32 1.17; K = 512: d = 64 0.95, 128 1.07; K = 256, d = 128: 1.00. One row: K d = 2^15
// and 2^16 0.95-1.17, 2^17 1.07-1.14, 2^18 1.16-1.33; 8 and 32 rows: 1.10-1.37 from 2^15.
constexpr AutoThresholds kAvx2Auto{24, 1024, int64_t{1} << 16, int64_t{1} << 17, int64_t{1} << 16};
// The AMX scan pays from smaller codebooks (same machine, same-process A/Bs at 230a014): from d = 48 at
// K d = 2^15 (512 x 64 1.15-1.20x, 256 x 128 1.15x; 1024 x 64 1.46-1.60x, 512 x 128 1.47-1.52x), from
// d = 32 at 2^16 (2048 x 32 1.21-1.25x); not at 2^14 (0.79-0.95x), 1024 x 32 (1.03-1.09x) or d = 24 below
// 2^17 (2048 x 24 0.93x).
constexpr int64_t kAmxMinCodes = 256;
constexpr int64_t kAmxMinDim = 32, kAmxWideDim = 48;
constexpr int64_t kAmxMinCodeFloats = int64_t{1} << 16;      // 32 <= d < 48
constexpr int64_t kAmxMinCodeFloatsWide = int64_t{1} << 15;  // d >= 48
// Building a codebook's int8 copy costs about one more pass over the pack (~3 ms at K = 65536, d = 64
// here), which the scan repays from about 128-256 rows on. So "auto" builds it for a call of at least
// this many rows, or for a pack taken from the cache (a codebook searched again: streaming); a smaller
// call on a fresh codebook runs the float32 search (prefilter_stats: deferred).
constexpr int64_t kPrefilterMinRowsToBuild = 256;

// "auto" (default: where prefilter_reason allows), "always" (any shape the kernel supports: tests),
// or "off". Throws std::invalid_argument for another name.
void set_prefilter_mode(const std::string& mode);
std::string prefilter_mode();

// The scan's kernel: "auto" (default: at SIMD level avx512, AMX-INT8 tiles where the CPU and OS allow, else
// AVX-512 VNNI, VNNI for a call of fewer than 12 rows; at level avx2, AVX2), "vnni", "amx", or "avx2" (the
// AVX2 scan at level avx512 too); std::invalid_argument where unavailable. prefilter_kernel() names the one
// larger calls use now ("" for none). All give the same outputs.
void set_prefilter_kernel(const std::string& kernel);
std::string prefilter_kernel();

// Why a call of n rows, K codes, dimension d runs the full search without the prefilter; empty when
// it tries the prefilter. (A call that tries it can still decline at run time, e.g. for a row with a
// non-finite entry: prefilter_stats counts those.)
std::string prefilter_reason(int64_t n, int64_t k, int64_t d);

struct PrefilterStats {
  int64_t calls = 0;         // calls answered through the prefilter
  int64_t rows_in_full = 0;  // rows of those calls whose candidates overflowed: scored over every panel
  int64_t declined = 0;      // calls that tried it and ran the full search instead
  int64_t codes_kept = 0;  // candidates the bound kept (rows not in full); scored in float32 where a row kept 2+
  int64_t candidates = 0;      // codes the scan listed for those rows (before the final threshold)
  int64_t deferred = 0;        // "auto" calls that ran the float32 search rather than build the int8 copy
  int64_t amx_calls = 0;       // calls answered whose scan ran on AMX tiles (the rest: VNNI)
  int64_t kept_rows_calls = 0;  // calls that took their rows' quantization from an earlier call (prefilter_rows.h)
};
PrefilterStats prefilter_stats();

// Writes nearest_code's outputs for these rows and returns true, or returns false having written
// nothing (the caller runs the full search, which also raises for a row out of range). hint (n codes, or
// null): a guess of each row's code, e.g. its last k-means assignment; it only sets where the scan starts,
// so the outputs are the same for any hint (a code outside [0, K) is a hint of nothing). rows_key (the
// caller's description of x, as cache_key is of the codebook): a hinted call of at least 1024 rows
// keeps its quantized rows under it for the next call with the same key and centre (prefilter_rows.h).
bool nearest_code_prefiltered(const float* x, int64_t n, const float* codebook, const PackedCodebook& pack,
                              const NearestCodeOutputs& out, int num_threads, const int64_t* hint = nullptr,
                              CacheKey rows_key = {});

}  // namespace fastvq::cpu
