// How fast this CPU's int8 products run against its fp32 FMAs: the VNNI scan's "auto" thresholds
// (nearest_code_prefilter.h) depend on it. Source: int8_speed.cpp.
#pragma once

#include <cstdint>

namespace fastvq::cpu {

// `iters` rounds of kInt8DotChains independent vpdpbusd chains (64 int8 multiply-adds each); returns a sum
// of the accumulators so the work cannot be optimised away. Compiled with -mavx512vnni
// (prefilter_avx512.cpp): call only after the CPU check.
constexpr int kInt8DotChains = 16;
#ifdef FASTVQ_HAVE_AVX512_VNNI_KERNEL
int32_t int8_dot_chains_avx512(int64_t iters, int32_t seed);
#endif

// int8 multiply-adds per second (vpdpbusd, 512-bit) over fp32 multiply-adds per second (vfmadd, 512-bit) on
// one core, measured once per process (about 1 ms, at the first call) and kept; 0 without AVX-512 VNNI.
// 4.0 on a Zen 5 (family 26), where both issue at the same rate; expected about 2 where the 512-bit vpdpbusd
// issues on one port and FMAs on two (Intel's server cores: not measured here).
double int8_product_ratio();

}  // namespace fastvq::cpu
