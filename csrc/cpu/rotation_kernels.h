// What the callers of the rotation rows share (quantize_backward.cpp, residual_level_backward.cpp): the
// versions for the dispatcher's current SIMD level, the per-code terms and a thread's scratch. Kept out of
// rotation_row.h, which the SIMD translation units include (see the note in kernels.h).
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/rotation_row.h"

namespace fastvq::cpu {

struct RotationKernels {
  RotationCodeFn code;
  RotationRowsFn rows;
};
RotationKernels rotation_kernels();
// rotation.code of each of the K codes, on up to nt threads.
std::vector<RotationCode> rotation_codes(const RotationKernels& rotation, const float* codebook, int64_t k,
                                         int64_t d, int nt);
// One thread's scratch for rotation.rows.
struct RotationScratch {
  explicit RotationScratch(int64_t d);
  std::vector<double> buffer;
  double* aligned;
};
constexpr int64_t kRotationRowsPerCall = 32 * kRotationBatch;  // rows per rotation.rows call in a work item

}  // namespace fastvq::cpu
