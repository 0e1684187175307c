// quantize_backward: gradients of the quantizer (straight-through or rotation trick) with its two
// VQ losses.
//
//   grad_x[i]        = G_i + commit_scale * (x[i] - codebook[idx_i])                    (float32)
//   grad_codebook[k] = codebook_scale * sum_{i : idx_i = k} (codebook[k] - x[i])
//
// G_i = g_i = grad_quantized[i] (straight-through), or with the rotation trick (Fifty et al. 2024,
// as vector-quantize-pytorch writes it; fastvq/reference.py: rotate_to), with q = codebook[idx_i]
// and vqp's safe division (eps = 1e-6):
//   n_x = max(|x|, eps), u = x / n_x, qhat = q / max(|q|, eps), a = u + qhat, w = a / max(|a|, eps),
//   s = |q| / n_x,   G_i = s * (g - 2 w (w.g) + 2 u (qhat.g))      (= s * R^T g; R is never built)
// |a| is summed from a = u + qhat formed elementwise (the expansion |u|^2 + |qhat|^2 + 2 u.qhat
// cancels when x ~ -q). Elements are float32; the row sums accumulate in double. A null
// grad_quantized means g = 0, so G = 0 either way. Each row is computed by one thread, in order.
//
// grad_codebook reuses ema_stats's per-code sums (code_groups.h): codes in parallel, each
// summing its rows in increasing row order in double, scaled and rounded once to float32, so
// the result is bitwise identical for any thread count. Codes with no rows get 0.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/code_groups.h"
#include "cpu/kernels.h"

namespace fastvq::cpu {
namespace {

// vector-quantize-pytorch's safe division: norms are clamped to at least this (fastvq.ops.ROTATION_EPS).
constexpr float kRotationEps = 1e-6f;

// |v|, the squares summed in double over four interleaved partial sums: independent add chains (the
// double sum's order does not show after its one rounding to float, but for rare last-bit ties).
float norm_of(const float* v, int64_t d) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t p = 0;
  for (; p + 4 <= d; p += 4) {
    s0 += static_cast<double>(v[p]) * v[p];
    s1 += static_cast<double>(v[p + 1]) * v[p + 1];
    s2 += static_cast<double>(v[p + 2]) * v[p + 2];
    s3 += static_cast<double>(v[p + 3]) * v[p + 3];
  }
  for (; p < d; ++p) s0 += static_cast<double>(v[p]) * v[p];
  return static_cast<float>(std::sqrt((s0 + s1) + (s2 + s3)));
}

// out = s * (g - 2 w (w.g) + 2 u (qhat.g)) + commit_scale * (x - q) for one row (see the top), with
// q_norm = |q| (per code, computed once) and scratch of 3 d floats. The elementwise float steps run
// in their own loops, which the compiler vectorizes (the same IEEE operations, so the same bits);
// the double sums run as independent partial sums.
void rotation_row(const float* g, const float* xi, const float* q, float q_norm, int64_t d, float commit_scale,
                  float* scratch, float* out) {
  float* __restrict u = scratch;
  float* __restrict qhat = scratch + d;
  float* __restrict a = scratch + 2 * d;
  const float x_norm = std::max(norm_of(xi, d), kRotationEps);
  const float q_div = std::max(q_norm, kRotationEps);
  for (int64_t p = 0; p < d; ++p) {
    u[p] = xi[p] / x_norm;
    qhat[p] = q[p] / q_div;
    a[p] = u[p] + qhat[p];
  }
  double sums[2][3] = {};  // a.a, a.g, qhat.g over even and odd p: six independent add chains
  int64_t p = 0;
  for (; p + 2 <= d; p += 2) {
    for (int j = 0; j < 2; ++j) {
      sums[j][0] += static_cast<double>(a[p + j]) * a[p + j];
      sums[j][1] += static_cast<double>(a[p + j]) * g[p + j];
      sums[j][2] += static_cast<double>(qhat[p + j]) * g[p + j];
    }
  }
  for (; p < d; ++p) {
    sums[0][0] += static_cast<double>(a[p]) * a[p];
    sums[0][1] += static_cast<double>(a[p]) * g[p];
    sums[0][2] += static_cast<double>(qhat[p]) * g[p];
  }
  const double a_sq = sums[0][0] + sums[1][0], a_dot_g = sums[0][1] + sums[1][1];
  const double qhat_dot_g = sums[0][2] + sums[1][2];
  const float a_div = std::max(static_cast<float>(std::sqrt(a_sq)), kRotationEps);
  const float s = q_norm / x_norm;
  // 2 w (w.g), with w.g = (a.g) / a_div and w = a / a_div formed elementwise, as the oracle does.
  const float two_w_dot_g = static_cast<float>(2.0 * a_dot_g / a_div);
  const float two_qhat_dot_g = static_cast<float>(2.0 * qhat_dot_g);
  for (int64_t p = 0; p < d; ++p) {
    const float w = a[p] / a_div;
    out[p] = s * (g[p] - w * two_w_dot_g + u[p] * two_qhat_dot_g) + commit_scale * (xi[p] - q[p]);
  }
}

}  // namespace

void quantize_backward(const float* grad_quantized, const float* x, int64_t n, int64_t d,
                       const float* codebook, int64_t k, const int64_t* indices,
                       float commit_scale, float codebook_scale, bool rotation_trick,
                       float* grad_x_out, float* grad_codebook_out, int num_threads) {
  const int nt = resolve_threads(num_threads);

  if (grad_x_out) {
    std::vector<float> code_norms;
    if (grad_quantized && rotation_trick) {
      code_norms.resize(static_cast<size_t>(k));  // O(K d): threads only where that beats a fork and a join
#pragma omp parallel for schedule(static) num_threads(nt) if (k * d >= (int64_t{1} << 20))
      for (int64_t c = 0; c < k; ++c) code_norms[c] = norm_of(codebook + c * d, d);
    }
#pragma omp parallel num_threads(nt)
    {
      std::vector<float> scratch(code_norms.empty() ? 0 : static_cast<size_t>(3 * d));
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        const float* xi = x + i * d;
        const float* e = codebook + indices[i] * d;
        float* out = grad_x_out + i * d;
        if (grad_quantized && rotation_trick) {
          rotation_row(grad_quantized + i * d, xi, e, code_norms[indices[i]], d, commit_scale, scratch.data(), out);
        } else if (grad_quantized) {
          const float* g = grad_quantized + i * d;
          for (int64_t p = 0; p < d; ++p) out[p] = g[p] + commit_scale * (xi[p] - e[p]);
        } else {
          for (int64_t p = 0; p < d; ++p) out[p] = commit_scale * (xi[p] - e[p]);
        }
      }
    }
  }

  if (grad_codebook_out) {
    // sum_i (e_k - x_i) = count_k * e_k - sum_i x_i, formed in double before the one rounding.
    const CodeGroups groups = group_rows_by_code(indices, n, k, nt);
    for_each_code_sum(x, d, groups, nt, [&](int64_t c, int64_t count, const double* sums) {
      const float* e = codebook + c * d;
      float* out = grad_codebook_out + c * d;
      for (int64_t p = 0; p < d; ++p)
        out[p] = static_cast<float>(codebook_scale * (static_cast<double>(count) * e[p] - sums[p]));
    });
  }
}

}  // namespace fastvq::cpu
