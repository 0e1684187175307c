// Host side of the int8 prefilter (prefilter.h): the codes' int8 copy, kept with their pack, the
// rows' quantization and the bound that makes the prefilter exact. Source: prefilter_codes.cpp.
#pragma once

#include <cstdint>
#include <memory>

#include "cpu/pack_codebook.h"
#include "cpu/prefilter.h"

namespace fastvq::cpu {

// The int8 copy of `pack`, built on first use and kept with it (a cached pack keeps its copy; the
// pack cache counts its bytes). Thread-safe.
std::shared_ptr<const QuantizedCodes> quantized_codes(const PackedCodebook& pack, int num_threads);

// Whether `pack` holds its int8 copy already.
bool has_quantized_codes(const PackedCodebook& pack);

// Quantize rows x[i * d] (i < count, count <= kRowBatch) around the pack's centre into xq[i] (codes.d4
// int32 each, group g of 4 levels at xq[i][g * stride]) and qrows[i], with each row's terms of the bound
// on the float32 kernels' score against S~. False when a row cannot be prefiltered: a non-finite entry, a
// centred norm outside the supported range, or scales whose product is not a normal float32 (then the
// whole call runs the full search, which also reports the bad row).
constexpr int kRowBatch = 8;
bool quantize_rows(const float* x, int64_t count, const float* centre, const QuantizedCodes& codes,
                   int32_t* const* xq, int64_t stride, QuantizedRow* qrows);

// Code `code`'s S~ for one quantized row (its group g of 4 levels at levels[g * stride]), computed as the
// scans compute it, so that it can start the row's running minimum (a hint); +inf for a code that can
// never win or a code outside [0, K).
float approximate_score(const QuantizedCodes& codes, const int32_t* levels, int64_t stride, const QuantizedRow& qrow,
                        int64_t code);

}  // namespace fastvq::cpu
