// The rotation trick's row gradients (quantize_backward.cpp has the definition), one version per SIMD
// level (rotation_row_{portable,avx2,avx512}.cpp, all from rotation_row.inc), bitwise the same.
#pragma once

#include <cstdint>

namespace fastvq::cpu {

// rotation_rows works on batches of this many rows, each step for the whole batch (rotation_row.inc), and
// needs rotation_scratch_doubles(d) of scratch: a batch's x, q and g, widened, each padded to blocks of 16.
constexpr int kRotationBatch = 8;
constexpr int64_t rotation_padded(int64_t d) { return (d + 15) / 16 * 16; }
constexpr int64_t rotation_scratch_doubles(int64_t d) { return kRotationBatch * 3 * rotation_padded(d); }

// What the rows need of a code q (d floats): |q|, 1 / max(|q|, eps) and |qhat|^2, in double.
struct RotationCode {
  double norm, inv, unit_sq;
};
using RotationCodeFn = RotationCode (*)(const float* q, int64_t d);
// For rows i in [begin, end) of the N x d matrices g, x and out, with q = codebook[indices[i]]:
// out[i] = s R^T g[i] + commit_scale (x[i] - q), given codes[c] = rotation_code(codebook[c]).
// scratch holds rotation_scratch_doubles(d) doubles (64-byte aligned is fastest).
using RotationRowsFn = void (*)(const float* g, const float* x, const float* codebook, const int64_t* indices,
                                const RotationCode* codes, int64_t begin, int64_t end, int64_t d,
                                float commit_scale, double* scratch, float* out);

#define FASTVQ_ROTATION_DECLARE(isa)                                                                        \
  RotationCode rotation_code_##isa(const float* q, int64_t d);                                              \
  void rotation_rows_##isa(const float* g, const float* x, const float* codebook, const int64_t* indices, \
                           const RotationCode* codes, int64_t begin, int64_t end, int64_t d,             \
                           float commit_scale, double* scratch, float* out);
FASTVQ_ROTATION_DECLARE(portable)
#ifdef FASTVQ_HAVE_AVX2_KERNEL
FASTVQ_ROTATION_DECLARE(avx2)
#endif
#ifdef FASTVQ_HAVE_AVX512_KERNEL
FASTVQ_ROTATION_DECLARE(avx512)
#endif
#undef FASTVQ_ROTATION_DECLARE

}  // namespace fastvq::cpu
