// int8_product_ratio (int8_speed.h): two bursts of independent chains, fp32 FMAs and int8 dot products,
// timed alternately on the calling thread; the best of a few rounds of each.
#include "cpu/int8_speed.h"

#include <algorithm>
#include <chrono>

#include "cpu/fma_peak.h"

namespace fastvq::cpu {
namespace {

constexpr int64_t kRounds = int64_t{1} << 15;  // 2^19 instructions: ~0.07 ms a burst at 2 a cycle, 4 GHz
constexpr int kTimings = 5;

template <typename Fn>
double seconds_of(Fn fn) {
  const auto start = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double measure() {
#if defined(FASTVQ_HAVE_AVX512_VNNI_KERNEL) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512vnni")) return 0.0;
  volatile float fma_sink = 0.0f;
  volatile int32_t dot_sink = 0;
  const auto fma = [&] { fma_sink = fma_sink + fma_chains_avx512(kRounds, 0.999f, 1e-3f); };
  const auto dot = [&] { dot_sink = dot_sink + int8_dot_chains_avx512(kRounds, 3); };
  fma();  // the clocks ramp up before the timed rounds
  dot();
  double fma_best = 1e30, dot_best = 1e30;
  for (int t = 0; t < kTimings; ++t) {
    fma_best = std::min(fma_best, seconds_of(fma));
    dot_best = std::min(dot_best, seconds_of(dot));
  }
  const double fma_rate = 16.0 * kFmaChainsAvx512 * kRounds / fma_best;  // fp32 multiply-adds a second
  const double dot_rate = 64.0 * kInt8DotChains * kRounds / dot_best;    // int8 multiply-adds a second
  return dot_rate / fma_rate;
#else
  return 0.0;
#endif
}

}  // namespace

double int8_product_ratio() {
  static const double ratio = measure();
  return ratio;
}

}  // namespace fastvq::cpu
