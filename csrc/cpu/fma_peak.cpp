// fma_peak: the machine's fp32 FMA peak, the benchmark's physical-limit yardstick (fma_peak.h).
//
// Every thread runs independent accumulator chains (acc = acc * a + b) at one SIMD level for a fixed
// number of rounds; the rate is the flops of all threads over the wall time of the parallel region,
// the best of a few rounds (a loaded machine only ever makes a round slower). The portable chains
// (this file, baseline ISA) are a multiply and an add per lane, counted as 2 flops like an FMA.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/fma_peak.h"
#include "cpu/kernels.h"

namespace fastvq::cpu {
namespace {

using ChainsFn = float (*)(int64_t, float, float);

struct Chains {
  ChainsFn fn;
  double flops_per_round;  // one round of every chain on one thread
};

Chains chains_for(SimdLevel level) {
  switch (level) {
#ifdef FASTVQ_HAVE_AVX512_KERNEL
    case SimdLevel::avx512: return {&fma_chains_avx512, 2.0 * 16 * kFmaChainsAvx512};
#endif
#ifdef FASTVQ_HAVE_AVX2_KERNEL
    case SimdLevel::avx2: return {&fma_chains_avx2, 2.0 * 8 * kFmaChainsAvx2};
#endif
    default: return {&fma_chains_portable, 2.0 * 4 * kFmaChainsPortable};
  }
}

SimdLevel parse_level(const char* name) {
  const std::string s = name;
  if (s.empty()) return current_simd_level();
  for (SimdLevel level : {SimdLevel::portable, SimdLevel::avx2, SimdLevel::avx512}) {
    if (s != simd_level_name(level)) continue;
    if (static_cast<int>(level) > static_cast<int>(best_simd_level()))
      throw std::invalid_argument("level '" + s + "' is not supported here (the best available is '" +
                                  simd_level_name(best_simd_level()) + "')");
    return level;
  }
  throw std::invalid_argument("level must be '' (the current level), 'portable', 'avx2' or 'avx512', got '" + s + "'");
}

// Seconds for `rounds` rounds on each of `threads` threads; the sums go to `sink` so nothing is dead code.
double timed(ChainsFn fn, int64_t rounds, int threads, volatile float* sink) {
  const auto start = std::chrono::steady_clock::now();
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  {
    const float sum = fn(rounds, 0.999f, 1e-3f * static_cast<float>(omp_get_thread_num() + 1));
#pragma omp atomic
    *const_cast<float*>(sink) += sum;
  }
#else
  (void)threads;
  *sink = *sink + fn(rounds, 0.999f, 1e-3f);
#endif
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double timed_here(ChainsFn fn, int64_t rounds, volatile float* sink) {
  const auto start = std::chrono::steady_clock::now();
  *sink = *sink + fn(rounds, 0.999f, 1e-3f);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

float fma_chains_portable(int64_t iters, float a, float b) {
  constexpr int C = kFmaChainsPortable;
  float acc[C][4];
  for (int c = 0; c < C; ++c)
    for (int l = 0; l < 4; ++l) acc[c][l] = static_cast<float>(c * 4 + l);
  for (int64_t i = 0; i < iters; ++i)
    for (int c = 0; c < C; ++c)
      for (int l = 0; l < 4; ++l) acc[c][l] = acc[c][l] * a + b;
  float sum = 0.0f;
  for (int c = 0; c < C; ++c)
    for (int l = 0; l < 4; ++l) sum += acc[c][l];
  return sum;
}

double fma_peak(const char* level, int num_threads, double seconds) {
  const Chains chains = chains_for(parse_level(level));
  if (!(seconds > 0.0) || seconds > 60.0)
    throw std::invalid_argument("seconds must be in (0, 60], got " + std::to_string(seconds));
  const int threads = resolve_threads(num_threads);
  volatile float sink = 0.0f;
  // Calibrate on this thread alone (the others may be descheduled on a loaded machine), after a warm-up
  // that ramps the clocks; every thread then runs the same number of rounds.
  int64_t rounds = 1 << 12;
  double elapsed = timed_here(chains.fn, rounds, &sink);
  while (elapsed < 2e-2 && rounds < (int64_t{1} << 40)) {
    rounds *= 4;
    elapsed = timed_here(chains.fn, rounds, &sink);
  }
  rounds = std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(rounds) * (seconds / 4.0) / elapsed));
  double best = 0.0;
  for (int r = 0; r < 4; ++r) best = std::max(best, chains.flops_per_round * rounds * threads / timed(chains.fn, rounds, threads, &sink) / 1e9);
  return best;
}

double fma_burst(const char* level, int num_threads, int64_t rounds) {
  const Chains chains = chains_for(parse_level(level));
  if (rounds < 1 || rounds > (int64_t{1} << 40))
    throw std::invalid_argument("rounds must be in [1, 2^40], got " + std::to_string(rounds));
  const int threads = resolve_threads(num_threads);
  volatile float sink = 0.0f;
  timed(chains.fn, rounds, threads, &sink);
  return chains.flops_per_round * static_cast<double>(rounds) * threads;
}

}  // namespace fastvq::cpu
