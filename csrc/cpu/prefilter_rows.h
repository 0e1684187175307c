// The int8 prefilter's quantized rows (prefilter.h): where each row's levels live for the scans, a call's
// blocks of quantized rows, and the rows kept from one search for the next search of the same rows.
// Source: prefilter_rows.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/prefilter.h"
#include "cpu/prefilter_codes.h"

namespace fastvq::cpu {

// How the rows are quantized (the kernel set whose scan reads them: its levels' range) and where row i's
// 4-byte group g lives: the VNNI and AVX2 scans read each 8-row subgroup interleaved (xq[g * 8 + r]), the
// AMX scan reads rows as tile rows (row_words int32 each). Rows are quantized in groups of kAmxRows (the
// driver's groups); the offsets of a group's rows from its first row's do not depend on where the group starts.
struct RowLayout {
  const PrefilterKernels* kernels;
  bool amx;
  int64_t d4, row_words;
  int64_t offset(int64_t i) const {
    return amx ? i * row_words : (i / kPrefilterRows) * d4 * kPrefilterRows + i % kPrefilterRows;
  }
  int64_t stride() const { return amx ? 1 : kPrefilterRows; }
  int64_t words(int64_t ngroups) const { return ngroups * kAmxRows * (amx ? row_words : d4); }
  bool operator==(const RowLayout& o) const {
    return kernels == o.kernels && amx == o.amx && d4 == o.d4 && row_words == o.row_words;
  }
};

struct KeptRows;

// Rows [r0, r0 + rows) of x quantized for one call's scan: their levels (laid out from r0, a group's first
// row) and terms of the bound.
struct QuantizedBlock {
  int64_t r0 = 0;
  std::vector<int32_t> xq;        // the levels quantize() made
  const int32_t* base = nullptr;  // row r0's levels: in xq, or in rows kept from an earlier call
  std::vector<QuantizedRow> qrows;
  // False when a row declines (bound_rows): the call then runs the full search. nt threads share
  // the rows when there are many (a work item's own rows take one). With `keep`, the levels and norms go
  // to its rows [first, first + rows) instead, for the next call (keep_rows).
  bool quantize(const float* x, int64_t first, int64_t rows, const float* centre, const QuantizedCodes& codes,
                const RowLayout& layout, int nt, KeptRows* keep = nullptr);
  // The same rows from rows kept by an earlier call (KeptRows below): their levels as kept, and only their
  // terms of the bound against these codes formed here. False as quantize().
  bool reuse(const KeptRows& kept, int64_t first, int64_t rows, const QuantizedCodes& codes);
  const int32_t* levels(const RowLayout& layout, int64_t row) const { return base + layout.offset(row - r0); }
  const QuantizedRow* terms(int64_t row) const { return qrows.data() + (row - r0); }
};

// All n rows of x quantized around a centre, kept for the next search of the same rows: k-means searches its
// x against each iteration's centroids, and the centre (search_centre: the codes' mean on a power-of-two
// grid) rarely moves. What depends on the codes, each row's terms of the bound, is formed per call
// (bound_rows); the levels and norms are what quantize_row_levels gives, so the outputs are the same.
struct KeptRows {
  std::vector<int64_t> key;  // the caller's description of x (CacheKey: identity, data pointer, version, ...)
  std::vector<float> centre;
  RowLayout layout{};
  int64_t n = 0, d = 0;
  std::vector<int32_t> xq;      // layout.words(groups), from row 0
  std::vector<RowLevels> rows;  // n
};

// Rows kept at most: one set, of at most this many bytes (a larger x is quantized per call as before).
constexpr size_t kMaxKeptRowsBytes = size_t{64} << 20;

// The kept rows of this key (non-empty), centre (equal as floats), shape and layout, or null.
std::shared_ptr<const KeptRows> find_kept_rows(CacheKey key, const float* centre, int64_t n, int64_t d,
                                               const RowLayout& layout);

// Room for the n rows of x under this key, for a call to quantize into (QuantizedBlock::quantize's `keep`);
// null when the copy would pass kMaxKeptRowsBytes (or the key is empty).
std::shared_ptr<KeptRows> new_kept_rows(CacheKey key, int64_t n, int64_t d, const float* centre,
                                        const RowLayout& layout);

// Keep these rows, every one quantized, in place of the rows kept before.
void keep_rows(std::shared_ptr<const KeptRows> kept);

// Drop the kept rows (a call using them keeps its copy until it ends); returns the bytes released.
size_t empty_kept_rows();
// The same, only if they were kept under this key (a caller done with that x: fastvq.kmeans).
size_t release_kept_rows(CacheKey key);

}  // namespace fastvq::cpu
