// Helpers shared by the search drivers nearest_code.cpp and nearest_codes.cpp, and by pack_codebook.cpp
// (never included by the SIMD translation units: see the note in kernels.h about inline functions).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <new>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/kernels.h"

namespace fastvq::cpu {

// Panels of the packed codebook kept hot while a group of rows is searched: ~512 KiB,
// well inside a 1-2 MiB L2 per core (tuned with benchmarks/nearest_code_cpu.py).
constexpr int64_t kBlockBytes = 512 * 1024;
// Row tiles per group: the group's rows of x (~96 rows) stay in L1/L2 across K blocks.
constexpr int64_t kTilesPerGroup = 16;
constexpr int64_t kGroupRows = kTilesPerGroup * kTileRows;
// A code chunk (when codes are split across threads) spans at least this many panels.
constexpr int64_t kMinChunkPanels = 16;
// Below about this much work (~0.2 ms on one core) a call does not start another thread.
constexpr int64_t kMinFlopsPerThread = int64_t{1} << 24;

// Bytes rounded up to whole 64-byte lines (buffers of aligned_alloc(64, ...), which needs a multiple).
inline size_t round_up64(size_t bytes) { return ((bytes + 63) / 64) * 64; }

struct AlignedFloats {
  float* ptr = nullptr;
  explicit AlignedFloats(int64_t n) {
    const size_t bytes = round_up64(static_cast<size_t>(n) * sizeof(float));
    ptr = static_cast<float*>(std::aligned_alloc(64, bytes == 0 ? 64 : bytes));
    if (!ptr) throw std::bad_alloc();
  }
  ~AlignedFloats() { std::free(ptr); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
};

// sum_p (a_p - b_p)^2 with 8 partial sums in a fixed order (vectorisable, deterministic).
inline float squared_l2(const float* a, const float* b, int64_t d) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t p = 0;
  for (; p + 8 <= d; p += 8)
    for (int j = 0; j < 8; ++j) {
      const float t = a[p + j] - b[p + j];
      acc[j] += t * t;
    }
  for (int j = 0; p < d; ++p, ++j) {
    const float t = a[p] - b[p];
    acc[j] += t * t;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

struct NearestCodeOutputs {
  int64_t* indices;
  float* sqdist;
  float* quantized;  // may be null
};

// Rows [r0, r1) of nearest_code: turn the running best into outputs. best_idx < 0 means no code
// had a finite distance (see the NaN note in nearest_code.cpp): report code 0.
inline void finish_rows(const float* x, int64_t d, const float* codebook, int64_t r0, int64_t r1,
                        const int64_t* best_idx, const NearestCodeOutputs& out) {
  for (int64_t i = r0; i < r1; ++i) {
    int64_t idx = best_idx[i - r0] < 0 ? 0 : best_idx[i - r0];
    float sqdist = squared_l2(x + i * d, codebook + idx * d, d);
    // A row of x holding +-inf can make the expansion -inf for some code, which then "wins".
    // Its true distance to every code is non-finite, so the rule gives it code 0.
    if (!std::isfinite(sqdist) && idx != 0) {
      idx = 0;
      sqdist = squared_l2(x + i * d, codebook, d);
    }
    const float* e = codebook + idx * d;
    out.indices[i] = idx;
    out.sqdist[i] = sqdist;
    if (out.quantized) std::copy(e, e + d, out.quantized + i * d);
  }
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Threads for a search of n rows against npanels panels: tiny problems run on fewer threads,
// since waking a thread costs more than it would save (the answer is the same for any count).
inline int search_threads(int num_threads, int64_t n, int64_t npanels, int64_t d) {
  const int64_t padded_flops = 2 * ((n + kTileRows - 1) / kTileRows) * kTileRows * npanels * kPanel * d;
  return static_cast<int>(std::min<int64_t>(resolve_threads(num_threads), 1 + padded_flops / kMinFlopsPerThread));
}

// Few row groups (e.g. N = 64, K = 65536) cannot keep every thread busy: split the codes too.
// The number of code chunks for n rows (1: no split).
inline int64_t code_chunks(int nt, int64_t n, int64_t npanels) {
  const int64_t ngroups = (n + kGroupRows - 1) / kGroupRows;
  const int64_t want_items = 4 * static_cast<int64_t>(nt);
  if (nt <= 1 || ngroups >= want_items) return 1;
  return std::max<int64_t>(1, std::min((want_items + ngroups - 1) / ngroups, npanels / kMinChunkPanels));
}

}  // namespace fastvq::cpu
