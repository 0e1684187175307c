// The machine's fp32 FMA peak: the physical-limit yardstick of the benchmark (fastvq.bench).
//
// Included by fma_peak_avx2.cpp and fma_peak_avx512.cpp, which are compiled with -mavx2 -mfma and
// -mavx512f: declarations only (see kernels.h for why).
#pragma once

#include <cstdint>

namespace fastvq::cpu {

// Independent accumulator chains per thread: enough to cover the FMA latency (4 cycles) times the
// FMA ports (2) of current x86 cores, with room to spare, and few enough to stay in registers.
constexpr int kFmaChainsPortable = 8;  // of 4 floats (SSE2 at the baseline ISA: a multiply and an add)
constexpr int kFmaChainsAvx2 = 12;     // ymm: 16 registers, 12 accumulators + 2 operands
constexpr int kFmaChainsAvx512 = 16;   // zmm: 32 registers

// `iters` rounds of every chain (acc = acc * a + b); returns a sum of the accumulators so the work
// cannot be optimised away. Flops per round: chains * lanes * 2.
float fma_chains_portable(int64_t iters, float a, float b);
#ifdef FASTVQ_HAVE_AVX2_KERNEL
float fma_chains_avx2(int64_t iters, float a, float b);
#endif
#ifdef FASTVQ_HAVE_AVX512_KERNEL
float fma_chains_avx512(int64_t iters, float a, float b);
#endif

// GFLOP/s of fp32 FMAs over num_threads threads (<= 0: the OpenMP default) at `level` ("" = the level
// the search dispatcher picks now; else "portable", "avx2" or "avx512", which must be supported here:
// std::invalid_argument otherwise). The best of a few timed rounds of about seconds / 4 each.
double fma_peak(const char* level, int num_threads, double seconds);

// One untimed burst: `rounds` rounds of every chain on each of num_threads threads at `level` (as
// above); returns the flops done. The benchmark times it beside a case's providers, in the same
// alternating rounds, so a row's share of the peak compares two medians taken under the same load.
double fma_burst(const char* level, int num_threads, int64_t rounds);

}  // namespace fastvq::cpu
