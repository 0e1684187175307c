// Per-code sums of rows, shared by ema_stats and quantize_backward: for each code, its rows added in
// increasing row order in double, so the results are bitwise identical for any number of threads.
//
// Two ways to the same sums (for_each_code_sum picks one):
// - streaming: each thread owns a range of codes and their double sums (small enough for its L2),
//   reads the indices and adds its codes' rows of x in row order: x is read once, in address order;
// - grouped (many codes): a stable counting sort puts the rows of code k at
//   rows[offsets[k] .. offsets[k+1]), in increasing i; codes are then summed in parallel.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastvq::cpu {

struct CodeGroups {
  std::vector<int64_t> offsets;  // K + 1 entries
  std::vector<int64_t> rows;     // N entries

  int64_t count(int64_t code) const { return offsets[code + 1] - offsets[code]; }
};

// O(N + K), on up to num_threads threads; the same result for any count. `indices` must already be
// validated to lie in [0, k).
CodeGroups group_rows_by_code(const int64_t* indices, int64_t n, int64_t k, int num_threads);

// sums[p] = sum over t < count of x[rows[t] * d + p] (x is d wide), added in t order in double, for every
// p < d (overwritten; zeros for count 0); sums[p] += row[p] in double for RowAddFn. The SIMD versions
// (code_sums_*.cpp) are bitwise the portable ones.
using CodeSumFn = void (*)(const float* x, int64_t d, const int64_t* rows, int64_t count, double* sums);
using RowAddFn = void (*)(const float* row, int64_t d, double* sums);
void code_sum_portable(const float* x, int64_t d, const int64_t* rows, int64_t count, double* sums);
void row_add_portable(const float* row, int64_t d, double* sums);
#ifdef FASTVQ_HAVE_AVX2_KERNEL
void code_sum_avx2(const float* x, int64_t d, const int64_t* rows, int64_t count, double* sums);
void row_add_avx2(const float* row, int64_t d, double* sums);
#endif
#ifdef FASTVQ_HAVE_AVX512_KERNEL
void code_sum_avx512(const float* x, int64_t d, const int64_t* rows, int64_t count, double* sums);
void row_add_avx512(const float* row, int64_t d, double* sums);
#endif
CodeSumFn code_sum_kernel();  // the best ones for the dispatcher's current SIMD level
RowAddFn row_add_kernel();

// Streaming pays when each thread's double sums stay in its L2; code ranges are cut so that each
// thread gets about the same number of rows. Returns the nt + 1 range ends, or {} (use grouping).
std::vector<int64_t> streaming_code_ranges(const int64_t* indices, int64_t n, int64_t k, int64_t d,
                                           int num_threads, std::vector<int64_t>& counts);

// The grouped way, for rows already grouped by code.
template <typename Emit>
void for_each_code_sum(const float* x, int64_t d, const CodeGroups& groups, int num_threads, Emit emit) {
  const int64_t k = static_cast<int64_t>(groups.offsets.size()) - 1;
  const CodeSumFn code_sum = code_sum_kernel();
  std::vector<double> scratch(static_cast<size_t>(num_threads) * d);
  // dynamic balances skewed code usage; each code's result is independent of who computes it.
#pragma omp parallel num_threads(num_threads)
  {
#ifdef _OPENMP
    double* acc = scratch.data() + static_cast<size_t>(omp_get_thread_num()) * d;
#else
    double* acc = scratch.data();
#endif
#pragma omp for schedule(dynamic, 16)
    for (int64_t c = 0; c < k; ++c) {
      code_sum(x, d, groups.rows.data() + groups.offsets[c], groups.count(c), acc);
      emit(c, groups.count(c), static_cast<const double*>(acc));
    }
  }
}

// For every code c, in parallel: sum (in double, in increasing row order) the rows of x (n x d)
// with indices[i] == c (validated to lie in [0, k)), then call emit(c, count, sums). The sums, and
// so whatever emit writes, do not depend on the thread count or the schedule.
template <typename Emit>
void for_each_code_sum(const float* x, int64_t n, int64_t d, const int64_t* indices, int64_t k, int num_threads,
                       Emit emit) {
  std::vector<int64_t> counts;
  const std::vector<int64_t> ranges = streaming_code_ranges(indices, n, k, d, num_threads, counts);
  if (!ranges.empty()) {
    const RowAddFn row_add = row_add_kernel();
    std::vector<double> sums(static_cast<size_t>(k * d));
    const int nt = static_cast<int>(ranges.size()) - 1;
#pragma omp parallel for schedule(static, 1) num_threads(nt)
    for (int t = 0; t < nt; ++t) {
      const int64_t c0 = ranges[t], c1 = ranges[t + 1];
      double* mine = sums.data() + c0 * d;  // zeroed by the vector, on one thread: small by construction
      if (c1 > c0) {
        for (int64_t i = 0; i < n; ++i) {
          const int64_t c = indices[i];
          if (c >= c0 && c < c1) row_add(x + i * d, d, mine + (c - c0) * d);
        }
      }
      for (int64_t c = c0; c < c1; ++c) emit(c, counts[c], static_cast<const double*>(sums.data() + c * d));
    }
    return;
  }
  for_each_code_sum(x, d, group_rows_by_code(indices, n, k, num_threads), num_threads, emit);
}

}  // namespace fastvq::cpu
