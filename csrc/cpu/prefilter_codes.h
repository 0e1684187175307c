// Host side of the int8 prefilter (prefilter.h): the codes' int8 copy, kept with their pack, the
// rows' quantization and the bound that makes the prefilter exact. Source: prefilter_codes.cpp.
#pragma once

#include <cstdint>
#include <memory>

#include "cpu/pack_codebook.h"
#include "cpu/prefilter.h"

namespace fastvq::cpu {

// The int8 copy of `pack`, built on first use (by any kernel set: all make the same bytes) and kept with it
// (a cached pack keeps its copy; the pack cache counts its bytes). Thread-safe.
std::shared_ptr<const QuantizedCodes> quantized_codes(const PackedCodebook& pack, const PrefilterKernels& kernels,
                                                      int num_threads);

// Whether `pack` holds its int8 copy already.
bool has_quantized_codes(const PackedCodebook& pack);

// Rows are quantized for the scan in two steps, so that rows quantized once can be bound against other codes
// (prefilter_rows.h). First what depends on the row and the centre alone: quantize_row_levels puts the row's
// levels for the scan of `kernels` around the centre into xq (d4 int32, group g of 4 levels at
// xq[g * stride]) and its scale, level sum and squared norms in double into `out`. Then bound_rows forms each row's terms of the bound on the float32
// kernels' score against S~ (count <= kRowBatch rows). Either is false when a row cannot be prefiltered: a
// non-finite entry, a centred norm outside the supported range, or scales whose product is not a normal
// float32 (then the whole call runs the full search, which also reports the bad row).
constexpr int kRowBatch = 8;
struct RowLevels {
  float scale = 0.0f;
  int32_t sum = 0;  // sum of the levels
  double norm_sq = 0, error_sq = 0, quant_sq = 0;  // ||x'||^2, ||x' - x^||^2, ||x^||^2
};
bool quantize_row_levels(const PrefilterKernels& kernels, const float* row, const float* centre, int64_t d,
                         int64_t d4, int32_t* xq, int64_t stride, RowLevels& out);
bool bound_rows(const RowLevels* rows, int64_t count, const QuantizedCodes& codes, QuantizedRow* qrows);

// Code `code`'s S~ for one quantized row (its group g of 4 levels at levels[g * stride]), computed as the
// scans compute it, so that it can start the row's running minimum (a hint); +inf for a code that can
// never win or a code outside [0, K).
float approximate_score(const QuantizedCodes& codes, const int32_t* levels, int64_t stride, const QuantizedRow& qrow,
                        int64_t code);

}  // namespace fastvq::cpu
