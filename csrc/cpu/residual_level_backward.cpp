// residual_level_backward: one level of ResidualVQ's greedy backward (fastvq/nn/greedy_levels.py) in
// one pass over the rows, where the composite path takes five (quantize_backward into a fresh tensor,
// an add into the running gradient, the gather of the level's codes, the rotation trick's test for
// tiny rows, the subtraction that rebuilds the next level's input):
//
//   grad_x[i] (+)= quantize_backward's grad_x[i] of (grad_quantized, residual, codebook, indices,
//                  commit_scale, rotation_trick), rounded to float32 first, as the composite path adds
//   advance:      residual[i] -= codebook[indices[i]]   (float32, the forward's subtraction)
//
// With the rotation trick the forward's value is not the code on rows with |residual| < eps
// (fastvq.ops._rotation_value_of_tiny_rows, torch arithmetic). Rows with a float32 sum of squares
// below (4 eps)^2 -- a superset of those, whatever that sum's rounding -- are left as they are and
// flagged in tiny_out, for the caller to rebuild with that same torch function.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/rotation_kernels.h"

namespace fastvq::cpu {
namespace {

constexpr float kTinyRowSquaredNorm = 16e-12f;  // (4 * fastvq.ops.ROTATION_EPS)^2

// sum_p v_p^2 in float32, 8 partial sums (vectorisable without reassociation). Only compared with a
// bound far above its rounding; an underflow can only make it smaller, which flags more rows.
float squared_norm(const float* v, int64_t d) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t p = 0;
  for (; p + 8 <= d; p += 8)
    for (int j = 0; j < 8; ++j) acc[j] += v[p + j] * v[p + j];
  for (int j = 0; p < d; ++p, ++j) acc[j] += v[p] * v[p];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

}  // namespace

void residual_level_backward(const float* grad_quantized, float* residual, int64_t n, int64_t d,
                             const float* codebook, int64_t k, const int64_t* indices, float commit_scale,
                             bool rotation_trick, bool accumulate, bool advance, float* grad_x, uint8_t* tiny_out,
                             int num_threads) {
  const int nt = resolve_threads(num_threads);
  const RotationKernels rotation = rotation_kernels();
  const std::vector<RotationCode> codes =
      rotation_trick ? rotation_codes(rotation, codebook, k, d, nt) : std::vector<RotationCode>();
  const int64_t items = (n + kRotationRowsPerCall - 1) / kRotationRowsPerCall;
#pragma omp parallel num_threads(nt)
  {
    RotationScratch scratch(rotation_trick ? d : 0);
    std::vector<float> level(static_cast<size_t>(kRotationRowsPerCall * d));  // this level's gradient rows
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t begin = item * kRotationRowsPerCall, end = std::min(begin + kRotationRowsPerCall, n);
      float* out = accumulate ? level.data() : grad_x + begin * d;
      if (rotation_trick) {
        rotation.rows(grad_quantized + begin * d, residual + begin * d, codebook, indices + begin, codes.data(), 0,
                      end - begin, d, commit_scale, scratch.aligned, out);
      } else {
        for (int64_t i = begin; i < end; ++i) {
          const float* g = grad_quantized + i * d;
          const float* r = residual + i * d;
          const float* e = codebook + indices[i] * d;
          float* o = out + (i - begin) * d;
          for (int64_t p = 0; p < d; ++p) o[p] = g[p] + commit_scale * (r[p] - e[p]);  // quantize_backward's
        }
      }
      if (accumulate) {
        float* acc = grad_x + begin * d;
        for (int64_t j = 0; j < (end - begin) * d; ++j) acc[j] += out[j];
      }
      if (!advance) continue;
      for (int64_t i = begin; i < end; ++i) {
        float* r = residual + i * d;
        const bool tiny = rotation_trick && squared_norm(r, d) < kTinyRowSquaredNorm;
        tiny_out[i] = tiny;
        if (tiny) continue;
        const float* e = codebook + indices[i] * d;
        for (int64_t p = 0; p < d; ++p) r[p] -= e[p];
      }
    }
  }
}

}  // namespace fastvq::cpu
