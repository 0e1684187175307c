// The codebook packed for the search micro-kernels (kernels.h), in a centred frame, and the
// bounded cache that keeps recent packs (shared by nearest_code and nearest_codes).
//
// Centred frame (issue 12, finding 5): distances are translation invariant, but the expansion
// ||e||^2 - 2 x.e cancels far from the origin. So every search runs on x - c and e - c, with
// c = search_centre(codebook) (fastvq.numerics.search_centre is the same rule in Python).
// The sqdist a kernel reports is computed directly in the original frame.
//
// Supported range (finding 6): in the centred frame, ||v - c||^2 <= kMaxCentredSquaredNorm for
// every finite code and every finite row of x. Then no float32 sum of the search or of the
// direct sqdist can overflow: |2 x'.e'| <= 2 ||x'|| ||e'|| <= FLT_MAX / 4 and
// ||x - e||^2 <= (||x'|| + ||e'||)^2 <= FLT_MAX / 2. Beyond it the kernels refuse (ValueError).
#pragma once

#include <atomic>
#include <cfloat>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "cpu/kernels.h"

namespace fastvq::cpu {

constexpr double kMaxCentredSquaredNorm = FLT_MAX / 8.0;  // about 4.25e37, i.e. ||v - c|| <= 6.5e18

// c (d floats): per dimension, over the codes whose entries are all finite, with the mean m and
// population std s in double: c = g * nearbyint(m / g), g = 2^ceil(log2 s), when s > 0; else m;
// 0 when no code is finite. Deterministic for any thread count (fixed chunking).
void search_centre(const float* codebook, int64_t k, int64_t d, float* centre, int num_threads);

struct QuantizedCodes;  // prefilter.h

// panels[q][p][j] = -2 (e_{16q+j,p} - c_p), norms[16q+j] = ||e - c||^2 (+inf past K), centre.
struct PackedCodebook {
  int64_t k = 0, d = 0, npanels = 0;
  float* panels = nullptr;  // 64-byte aligned, npanels * d * kPanel
  float* norms = nullptr;   // 64-byte aligned, npanels * kPanel
  float* centre = nullptr;  // d
  size_t capacity_bytes = 0;
  std::vector<int64_t> key;  // empty: not reusable as a result, only as a buffer
  // The int8 prefilter's copy (prefilter_codes.h: quantized_codes), built on first use; its bytes
  // count towards the cache's bound.
  mutable std::mutex quantized_mutex;
  mutable std::shared_ptr<const QuantizedCodes> quantized;
  mutable std::atomic<size_t> quantized_bytes{0};
  // How many calls took this pack from the cache (0 for a pack built by this call).
  mutable std::atomic<int64_t> cache_hits{0};
  PackedCodebook() = default;
  ~PackedCodebook();
  PackedCodebook(const PackedCodebook&) = delete;
  PackedCodebook& operator=(const PackedCodebook&) = delete;
};

// The packed codebook for this call. With a non-empty `key` (a description of the caller's
// tensor that changes whenever its contents may have: identity, data pointer, shape, strides,
// version counter), a cached pack with the same key is returned without repacking. Throws
// std::invalid_argument naming `codebook` when a finite code is outside the supported range.
std::shared_ptr<const PackedCodebook> packed_codebook(const float* codebook, int64_t k, int64_t d,
                                                      CacheKey key, int num_threads);

// Evict idle packs, least recently used first, until the cache is within its bounds again (after a
// pack grew: quantized_codes).
void trim_pack_cache();

// Drop every cached pack (packs in use stay alive until their call ends); returns bytes released.
size_t empty_pack_cache();
// Bytes the cache holds now (in use or not), and its bound.
size_t pack_cache_bytes();
constexpr size_t kPackCacheBytes = size_t{256} << 20;
constexpr size_t kPackCacheEntries = 4;

// Rows [r0, r1) of x, centred and packed as tiles of kTileRows rows:
// dst[t][p][r] = x[r0 + t*kTileRows + r][p] - centre[p], zeros past r1. Returns the first row
// with finite entries whose centred squared norm exceeds kMaxCentredSquaredNorm, or -1.
int64_t pack_rows(const float* x, int64_t d, int64_t r0, int64_t r1, const float* centre, float* dst);

// The std::invalid_argument for such a row of x.
[[noreturn]] void throw_row_out_of_range(const float* x, int64_t d, int64_t row, const float* centre);

}  // namespace fastvq::cpu
