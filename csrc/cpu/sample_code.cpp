// sample_code: vector-quantize-pytorch's stochastic_sample_codes as one fused Gumbel-max pass.
//
// indices[i] = argmin_k (score(i, k) - noise(i, k)), ties to the lowest k, where score is vqp's
// -logit (sqrt(max(|x_i - e_k|^2, 1e-8)), or -x_i.e_k with cosine) and noise is
// float32(T * -log(-log(u))) with u hashed from (seed, i, k). The hash is specified in
// fastvq/reference.py (sample_noise) and implemented bit for bit here and in
// fastvq/triton/sample_code.py. Nothing of size N x K is stored: each row walks the codebook
// once, keeping its running minimum. Rows run in parallel; the result does not depend on the
// thread count.
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/kernels.h"

namespace fastvq::cpu {
namespace {

constexpr uint32_t kGolden = 0x9E3779B9u;

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// float32(T * -log(-log(u))), u = (2 * (bits >> 9) + 1) / 2^24, in double then rounded once.
inline float scaled_gumbel(uint32_t bits, double temperature) {
  const double u = static_cast<double>((bits >> 9) * 2u + 1u) / 16777216.0;
  return static_cast<float>(temperature * -std::log(-std::log(u)));
}

}  // namespace

void sample_code(const float* x, int64_t n, int64_t d, const float* codebook, int64_t k, double temperature,
                 int64_t seed, bool cosine, int64_t* indices_out, int num_threads) {
  const uint64_t useed = static_cast<uint64_t>(seed);
  const uint32_t seed_lo = static_cast<uint32_t>(useed), seed_hi = static_cast<uint32_t>(useed >> 32);
  std::vector<uint32_t> code_key(static_cast<size_t>(k));
  for (int64_t c = 0; c < k; ++c) code_key[c] = fmix32(static_cast<uint32_t>(c) ^ seed_hi ^ kGolden);
  // The noise never exceeds T * 16.64 (u >= 2^-24), so a code whose score minus that bound is not
  // below the running best cannot win: its noise (two logs) is skipped. The result is unchanged.
  const float max_noise = static_cast<float>(temperature * 16.64);
  const int nt = resolve_threads(num_threads);
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t row = static_cast<uint64_t>(i);
    const uint32_t row_key = fmix32(fmix32(static_cast<uint32_t>(row) ^ seed_lo) ^ static_cast<uint32_t>(row >> 32));
    const float* xi = x + i * d;
    float best = std::numeric_limits<float>::infinity();
    int64_t best_k = 0;
    for (int64_t c = 0; c < k; ++c) {
      const float* ec = codebook + c * d;
      float acc = 0.0f;
      float score;
      if (cosine) {
#pragma omp simd reduction(+ : acc)
        for (int64_t p = 0; p < d; ++p) acc += xi[p] * ec[p];
        score = -acc;
      } else {
#pragma omp simd reduction(+ : acc)
        for (int64_t p = 0; p < d; ++p) {
          const float diff = xi[p] - ec[p];
          acc += diff * diff;
        }
        score = std::sqrt(acc < 1e-8f ? 1e-8f : acc);  // vqp's clamp; a NaN stays NaN
      }
      if (score - max_noise >= best) continue;
      const float noise = scaled_gumbel(fmix32(row_key ^ code_key[c]), temperature);
      const float perturbed = score - noise;
      if (perturbed < best) {  // NaN never wins; a row with no finite score keeps 0
        best = perturbed;
        best_k = c;
      }
    }
    indices_out[i] = best_k;
  }
}

}  // namespace fastvq::cpu
