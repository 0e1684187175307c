// Per-code sums (code_groups.h): the portable kernels and their SIMD dispatch, the streaming path's
// code ranges, and the stable counting sort of rows by code for the grouped path.
//
// The sort, in parallel: each thread counts the codes of its contiguous slice of rows, the per-thread counts are
// turned into each thread's first slot for each code (threads in row order), and each thread scatters
// its rows there. Slices are in row order, so the result is the serial sort's, for any thread count.
#include "cpu/code_groups.h"

#include <memory>

#include "cpu/kernels.h"

namespace fastvq::cpu {
namespace {

constexpr int64_t kMinRowsPerThread = 8192;  // below this, a thread's slice costs less than waking it
// Double sums a streaming thread may own: within L2 with x's stream beside them (1 MiB on Zen 4, 2 on SPR).
constexpr int64_t kStreamBytesPerThread = 512 << 10;

void group_serial(const int64_t* indices, int64_t n, int64_t k, CodeGroups& g) {
  for (int64_t i = 0; i < n; ++i) ++g.offsets[indices[i] + 1];
  for (int64_t c = 0; c < k; ++c) g.offsets[c + 1] += g.offsets[c];
  std::vector<int64_t> next(g.offsets.begin(), g.offsets.end() - 1);
  for (int64_t i = 0; i < n; ++i) g.rows[next[indices[i]]++] = i;
}

}  // namespace

void code_sum_portable(const float* x, int64_t d, const int64_t* rows, int64_t count, double* sums) {
  std::fill(sums, sums + d, 0.0);
  for (int64_t t = 0; t < count; ++t) {
    const float* row = x + rows[t] * d;
    for (int64_t p = 0; p < d; ++p) sums[p] += row[p];
  }
}

void row_add_portable(const float* row, int64_t d, double* sums) {
  for (int64_t p = 0; p < d; ++p) sums[p] += row[p];
}

RowAddFn row_add_kernel() {
  switch (current_simd_level()) {
#ifdef FASTVQ_HAVE_AVX512_KERNEL
    case SimdLevel::avx512: return row_add_avx512;
#endif
#ifdef FASTVQ_HAVE_AVX2_KERNEL
    case SimdLevel::avx2: return row_add_avx2;
#endif
    default: return row_add_portable;
  }
}

std::vector<int64_t> streaming_code_ranges(const int64_t* indices, int64_t n, int64_t k, int64_t d,
                                           int num_threads, std::vector<int64_t>& counts) {
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(num_threads, n / kMinRowsPerThread));
  if (k * d * static_cast<int64_t>(sizeof(double)) > nt * kStreamBytesPerThread) return {};
  counts.assign(static_cast<size_t>(k), 0);
  for (int64_t i = 0; i < n; ++i) ++counts[indices[i]];
  std::vector<int64_t> ranges(static_cast<size_t>(nt + 1), k);
  ranges[0] = 0;
  int64_t seen = 0, t = 1;
  for (int64_t c = 0; c < k && t < nt; ++c) {  // cut after the code that reaches thread t's share of rows
    seen += counts[c];
    while (t < nt && seen * nt >= n * t) ranges[t++] = c + 1;
  }
  return ranges;
}

CodeSumFn code_sum_kernel() {
  switch (current_simd_level()) {
#ifdef FASTVQ_HAVE_AVX512_KERNEL
    case SimdLevel::avx512: return code_sum_avx512;
#endif
#ifdef FASTVQ_HAVE_AVX2_KERNEL
    case SimdLevel::avx2: return code_sum_avx2;
#endif
    default: return code_sum_portable;
  }
}

CodeGroups group_rows_by_code(const int64_t* indices, int64_t n, int64_t k, int num_threads) {
  CodeGroups g;
  g.offsets.assign(static_cast<size_t>(k + 1), 0);
  g.rows.resize(static_cast<size_t>(n));
  // Each thread holds k counters: bound them by a few times n, so a huge k with few rows stays O(n + k).
  const int64_t nt =
      k == 0 ? 1 : std::max<int64_t>(1, std::min<int64_t>({num_threads, n / kMinRowsPerThread, 4 * n / k}));
  if (nt == 1) {
    group_serial(indices, n, k, g);
    return g;
  }
  std::unique_ptr<int64_t[]> slots(new int64_t[static_cast<size_t>(nt * k)]);  // [thread][code]
#pragma omp parallel num_threads(static_cast<int>(nt))
  {
#ifdef _OPENMP
    const int64_t t = omp_get_thread_num();
#else
    const int64_t t = 0;
#endif
    const int64_t lo = n * t / nt, hi = n * (t + 1) / nt;
    int64_t* mine = slots.get() + t * k;
    std::fill(mine, mine + k, int64_t{0});
    for (int64_t i = lo; i < hi; ++i) ++mine[indices[i]];
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t c = 0; c < k; ++c) {  // counts -> each thread's offset within code c's group
      int64_t total = 0;
      for (int64_t u = 0; u < nt; ++u) {
        const int64_t count = slots[u * k + c];
        slots[u * k + c] = total;
        total += count;
      }
      g.offsets[c + 1] = total;
    }
#pragma omp single
    for (int64_t c = 0; c < k; ++c) g.offsets[c + 1] += g.offsets[c];
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t c = indices[i];
      g.rows[g.offsets[c] + mine[c]++] = i;
    }
  }
  return g;
}

}  // namespace fastvq::cpu
