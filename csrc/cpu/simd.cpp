// Run-time choice of the nearest_code micro-kernel, and thread-count helpers.
// Compiled for the baseline ISA; the AVX2 kernel is only called after the CPU check.
#include <atomic>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/kernels.h"

namespace fastvq::cpu {
namespace {

bool cpu_has_avx2_fma() {
#if defined(FASTVQ_HAVE_AVX2_KERNEL) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512f() {
#if defined(FASTVQ_HAVE_AVX512_KERNEL) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");  // also requires the OS to save the zmm state
#else
  return false;
#endif
}

SimdLevel detect_best() {
  if (cpu_has_avx512f()) return SimdLevel::avx512;
  if (cpu_has_avx2_fma()) return SimdLevel::avx2;
  return SimdLevel::portable;
}

std::atomic<int>& level_state() {
  static std::atomic<int> level{static_cast<int>(detect_best())};
  return level;
}

}  // namespace

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::avx512: return "avx512";
    case SimdLevel::avx2: return "avx2";
    case SimdLevel::portable: return "portable";
  }
  return "unknown";
}

SimdLevel best_simd_level() {
  static const SimdLevel best = detect_best();
  return best;
}

SimdLevel current_simd_level() { return static_cast<SimdLevel>(level_state().load()); }

void set_simd_level(const char* name) {
  const std::string s = name;
  SimdLevel wanted;
  if (s == "auto") {
    wanted = best_simd_level();
  } else if (s == "portable") {
    wanted = SimdLevel::portable;
  } else if (s == "avx2") {
    wanted = SimdLevel::avx2;
  } else if (s == "avx512") {
    wanted = SimdLevel::avx512;
  } else {
    throw std::invalid_argument("level must be one of 'auto', 'portable', 'avx2', 'avx512', got '" + s + "'");
  }
  if (static_cast<int>(wanted) > static_cast<int>(best_simd_level()))
    throw std::invalid_argument("level '" + s + "' is not supported here (the best available is '" +
                                simd_level_name(best_simd_level()) + "')");
  level_state().store(static_cast<int>(wanted));
}

SearchTileFn current_search_tile() {
  switch (current_simd_level()) {
#ifdef FASTVQ_HAVE_AVX512_KERNEL
    case SimdLevel::avx512: return &search_tile_avx512;
#endif
#ifdef FASTVQ_HAVE_AVX2_KERNEL
    case SimdLevel::avx2: return &search_tile_avx2;
#endif
    default: return &search_tile_portable;
  }
}

SearchTileFn current_search_rows18() {
#ifdef FASTVQ_HAVE_AVX512_KERNEL
  if (current_simd_level() == SimdLevel::avx512) return &search_rows18_avx512;
#endif
  return nullptr;
}

SearchFewRowsFn current_search_few_rows() {
#ifdef FASTVQ_HAVE_AVX512_KERNEL
  if (current_simd_level() == SimdLevel::avx512) return &search_few_rows_avx512;
#endif
#ifdef FASTVQ_HAVE_AVX2_KERNEL
  if (current_simd_level() == SimdLevel::avx2) return &search_few_rows_avx2;
#endif
  return nullptr;
}

SearchTileTopkFn current_search_tile_topk() {
  switch (current_simd_level()) {
#ifdef FASTVQ_HAVE_AVX512_KERNEL
    case SimdLevel::avx512: return &search_tile_topk_avx512;
#endif
#ifdef FASTVQ_HAVE_AVX2_KERNEL
    case SimdLevel::avx2: return &search_tile_topk_avx2;
#endif
    default: return &search_tile_topk_portable;
  }
}

bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int resolve_threads(int num_threads) {
#ifdef _OPENMP
  return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
  return 1;
#endif
}

}  // namespace fastvq::cpu
