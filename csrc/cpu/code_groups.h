// Rows grouped by code: a stable counting sort shared by ema_stats and quantize_backward.
//
// rows[offsets[k] .. offsets[k+1]) are the rows i with indices[i] == k, in increasing i.
// Per-code reductions then walk their rows in that fixed order, so their results are
// bitwise identical for any number of threads.
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
// p < d (overwritten; zeros for count 0). The SIMD versions (code_sums_*.cpp) are bitwise the portable one.
using CodeSumFn = void (*)(const float* x, int64_t d, const int64_t* rows, int64_t count, double* sums);
void code_sum_portable(const float* x, int64_t d, const int64_t* rows, int64_t count, double* sums);
#ifdef FASTVQ_HAVE_AVX2_KERNEL
void code_sum_avx2(const float* x, int64_t d, const int64_t* rows, int64_t count, double* sums);
#endif
#ifdef FASTVQ_HAVE_AVX512_KERNEL
void code_sum_avx512(const float* x, int64_t d, const int64_t* rows, int64_t count, double* sums);
#endif
CodeSumFn code_sum_kernel();  // the best one for the dispatcher's current SIMD level

// For every code c, in parallel over codes: sum (in double, in increasing row order) the rows
// of x (d wide) assigned to c, then call emit(c, count, sums). The sums, and so whatever emit
// writes, do not depend on the thread count or the schedule.
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

}  // namespace fastvq::cpu
