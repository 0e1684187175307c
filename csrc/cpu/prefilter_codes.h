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

// Quantize row x (d floats) around the pack's centre into xq (codes.d4 int32) and qrow, with the row's
// terms of the bound on the float32 kernels' score against S~. False when the row cannot be prefiltered:
// a non-finite entry, a centred norm outside the supported range, or scales whose product is not a
// normal float32 (then the whole call runs the full search, which also reports the bad row).
// Group g of 4 levels goes to xq[g * stride].
bool quantize_row(const float* x, const float* centre, const QuantizedCodes& codes, int32_t* xq, int64_t stride,
                  QuantizedRow& qrow);

}  // namespace fastvq::cpu
