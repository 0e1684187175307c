// nearest_code: fused nearest-codebook search + squared distance + gather, without ever
// forming the N x K distance matrix.
//
//   1. Pack the codebook once into panels of 16 codes holding -2*e, plus ||e||^2 (kernels.h).
//   2. Search: for each group of rows, for each L2-sized block of panels, for each tile of
//      6 rows, the SIMD micro-kernel folds ||e||^2 - 2 x.e into a running best per row.
//   3. Finish each row in one cheap O(d) pass: sqdist = sum_p (x_p - e_p)^2 computed directly
//      (accurate and >= 0, unlike the expansion), and the gather into quantized_out.
//
// Determinism: the value for a (row, code) pair is computed by the same instruction sequence
// whatever the threading, and the selection (smallest value, ties to the lowest index) does
// not depend on how codes are grouped, so results are identical for any thread count.
//
// NaN / inf: a distance that is NaN never replaces a finite (or any) candidate, and neither
// does +inf. So codebook rows containing NaN/inf are skipped; a row of x whose distances are
// all NaN or +inf gets index 0, and so does a row whose chosen code's direct sqdist is not
// finite (x holding +-inf can drive the expansion to -inf); its sqdist is then computed
// directly against code 0 (NaN or inf). No crash in any case. This is the rule of
// fastvq.reference.nearest_code (a non-finite distance counts as +inf). Values so large that
// ||x||^2 or ||e||^2 overflow float32 (|v| > ~1e19) make the expansion itself non-finite and
// are outside the contract.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <new>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/kernels.h"

namespace fastvq::cpu {
namespace {

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

struct AlignedFloats {
  float* ptr = nullptr;
  explicit AlignedFloats(int64_t n) {
    const size_t bytes = ((static_cast<size_t>(n) * sizeof(float) + 63) / 64) * 64;
    ptr = static_cast<float*>(std::aligned_alloc(64, bytes == 0 ? 64 : bytes));
    if (!ptr) throw std::bad_alloc();
  }
  ~AlignedFloats() { std::free(ptr); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
};

// The packed codebook of the calling thread is kept between calls (up to kRetainBytes), so a
// training loop does not map and page-fault a fresh buffer on every call (64 MiB for
// K = 65536, d = 256). Larger ones are allocated for the call only.
constexpr size_t kRetainBytes = size_t{256} << 20;

struct RetainedBuffer {
  float* ptr = nullptr;
  size_t bytes = 0;
  ~RetainedBuffer() { std::free(ptr); }
};

float* pack_workspace(int64_t n, std::unique_ptr<AlignedFloats>& temporary) {
  const size_t bytes = ((static_cast<size_t>(n) * sizeof(float) + 63) / 64) * 64;
  if (bytes > kRetainBytes) {
    temporary = std::make_unique<AlignedFloats>(n);
    return temporary->ptr;
  }
  thread_local RetainedBuffer kept;
  if (kept.bytes < bytes) {
    std::free(kept.ptr);
    kept.bytes = 0;
    kept.ptr = static_cast<float*>(std::aligned_alloc(64, bytes == 0 ? 64 : bytes));
    if (!kept.ptr) throw std::bad_alloc();
    kept.bytes = bytes;
  }
  return kept.ptr;
}

// ||e||^2 in double with 4 partial sums (a fixed order, so deterministic; independent chains,
// so not bound by the add latency), rounded once to float.
inline float squared_norm(const float* e, int64_t d) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t p = 0;
  for (; p + 4 <= d; p += 4)
    for (int j = 0; j < 4; ++j) acc[j] += static_cast<double>(e[p + j]) * e[p + j];
  for (int j = 0; p < d; ++p, ++j) acc[j] += static_cast<double>(e[p]) * e[p];
  return static_cast<float>((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

// Packing is O(K d); below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelPackElements = int64_t{1} << 18;

void pack_codebook(const float* codebook, int64_t k, int64_t d, int64_t npanels, float* panels,
                   float* norms, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt) if (k * d >= kParallelPackElements)
  for (int64_t q = 0; q < npanels; ++q) {
    float* dst = panels + q * d * kPanel;
    const int64_t valid = std::min<int64_t>(kPanel, k - q * kPanel);
    const float* e = codebook + q * kPanel * d;
    for (int j = 0; j < kPanel; ++j)
      norms[q * kPanel + j] = j < valid ? squared_norm(e + j * d, d) : std::numeric_limits<float>::infinity();
    // Transpose with the exact scaling by -2; codes past K get 0 (their +inf norm decides).
    for (int64_t p = 0; p < d; ++p) {
      float* row = dst + p * kPanel;
      for (int j = 0; j < valid; ++j) row[j] = -2.0f * e[j * d + p];
      for (int j = static_cast<int>(valid); j < kPanel; ++j) row[j] = 0.0f;
    }
  }
}

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

struct Outputs {
  int64_t* indices;
  float* sqdist;
  float* quantized;  // may be null
};

// Rows [r0, r1): turn the running best into outputs. best_idx < 0 means no code had a
// finite distance (see the NaN note above): report code 0.
inline void finish_rows(const float* x, int64_t d, const float* codebook, int64_t r0, int64_t r1,
                        const int64_t* best_idx, const Outputs& out) {
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

// Rows [r0, r1) of x as packed tiles: dst[t][p][r] = x[r0 + t*kTileRows + r][p], zeros past r1.
void pack_rows(const float* x, int64_t d, int64_t r0, int64_t r1, float* dst) {
  for (int64_t t0 = r0; t0 < r1; t0 += kTileRows, dst += d * kTileRows) {
    for (int r = 0; r < kTileRows; ++r) {
      const int64_t row = t0 + r;
      if (row < r1) {
        const float* src = x + row * d;
        for (int64_t p = 0; p < d; ++p) dst[p * kTileRows + r] = src[p];
      } else {
        for (int64_t p = 0; p < d; ++p) dst[p * kTileRows + r] = 0.0f;
      }
    }
  }
}

struct Search {
  SearchTileFn tile;
  int64_t d;
  const float* panels;
  const float* norms;
  int64_t npanels;
  int64_t block_panels;

  // `ntiles` packed tiles against panels [q_begin, q_end), K-blocked, merged into best_*
  // (kTileRows entries per tile).
  void tiles(const float* xpack, int64_t ntiles, int64_t q_begin, int64_t q_end, float* best_val,
             int64_t* best_idx) const {
    for (int64_t q0 = q_begin; q0 < q_end; q0 += block_panels) {
      const int64_t nq = std::min(block_panels, q_end - q0);
      for (int64_t t = 0; t < ntiles; ++t)
        tile(xpack + t * d * kTileRows, d, panels + q0 * d * kPanel, norms + q0 * kPanel, nq,
             q0 * kPanel, best_val + t * kTileRows, best_idx + t * kTileRows);
    }
  }
};

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Both schedules hand out work items dynamically, so a thread that loses its core (shared
// machines) does not hold up the others; no result depends on which thread runs which item.

// One work item per group of rows: search all codes, then finish the group's rows.
void search_by_row_groups(const Search& search, const float* x, int64_t n, const float* codebook,
                          const Outputs& out, int nt) {
  const int64_t d = search.d;
  const int64_t ngroups = (n + kGroupRows - 1) / kGroupRows;
  AlignedFloats xpack(static_cast<int64_t>(nt) * kGroupRows * d);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t g = 0; g < ngroups; ++g) {
    const int64_t r0 = g * kGroupRows, r1 = std::min(n, r0 + kGroupRows);
    float* xp = xpack.ptr + thread_id() * kGroupRows * d;
    pack_rows(x, d, r0, r1, xp);
    float best_val[kGroupRows];
    int64_t best_idx[kGroupRows];
    std::fill(best_val, best_val + kGroupRows, std::numeric_limits<float>::infinity());
    std::fill(best_idx, best_idx + kGroupRows, int64_t{-1});
    search.tiles(xp, (r1 - r0 + kTileRows - 1) / kTileRows, 0, search.npanels, best_val, best_idx);
    finish_rows(x, d, codebook, r0, r1, best_idx, out);
  }
}

// One work item per (row group, code chunk) pair, the codes split into `nchunks` contiguous
// chunks. Each chunk keeps its own running best per row; the chunks are merged afterwards in
// code order with the same strict rule, so ties still go to the lowest index.
void search_by_code_chunks(const Search& search, const float* x, int64_t n, const float* codebook,
                           int64_t nchunks, const Outputs& out, int nt) {
  const int64_t d = search.d, npanels = search.npanels;
  const int64_t ngroups = (n + kGroupRows - 1) / kGroupRows;
  const int64_t npad = ngroups * kGroupRows;  // few rows here: pack them all once
  AlignedFloats xpack(npad * d);
  pack_rows(x, d, 0, n, xpack.ptr);
  std::vector<float> chunk_val(static_cast<size_t>(nchunks * npad), std::numeric_limits<float>::infinity());
  std::vector<int64_t> chunk_idx(static_cast<size_t>(nchunks * npad), -1);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t item = 0; item < ngroups * nchunks; ++item) {
    const int64_t g = item / nchunks, c = item % nchunks;
    const int64_t r0 = g * kGroupRows, r1 = std::min(n, r0 + kGroupRows);
    const int64_t q_begin = npanels * c / nchunks, q_end = npanels * (c + 1) / nchunks;
    search.tiles(xpack.ptr + r0 * d, (r1 - r0 + kTileRows - 1) / kTileRows, q_begin, q_end,
                 chunk_val.data() + c * npad + r0, chunk_idx.data() + c * npad + r0);
  }
  std::vector<int64_t> best_idx(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    float v = chunk_val[i];
    int64_t idx = chunk_idx[i];
    for (int64_t c = 1; c < nchunks; ++c)
      if (chunk_val[c * npad + i] < v) {
        v = chunk_val[c * npad + i];
        idx = chunk_idx[c * npad + i];
      }
    best_idx[i] = idx;
  }
  finish_rows(x, d, codebook, 0, n, best_idx.data(), out);
}

}  // namespace

void nearest_code(const float* x, int64_t n, int64_t d, const float* codebook, int64_t k,
                  int64_t* indices_out, float* sqdist_out, float* quantized_out, int num_threads) {
  if (n == 0) return;
  const int64_t npanels = (k + kPanel - 1) / kPanel;
  // Tiny problems run on fewer threads: waking a thread costs more than it would save
  // (the answer is the same for any thread count).
  const int64_t padded_flops = 2 * ((n + kTileRows - 1) / kTileRows) * kTileRows * npanels * kPanel * d;
  const int nt = static_cast<int>(std::min<int64_t>(resolve_threads(num_threads), 1 + padded_flops / kMinFlopsPerThread));
  std::unique_ptr<AlignedFloats> temporary;
  float* const panels = pack_workspace(npanels * (d + 1) * kPanel, temporary);
  float* const norms = panels + npanels * d * kPanel;  // still 64-byte aligned
  pack_codebook(codebook, k, d, npanels, panels, norms, nt);

  const int64_t panel_bytes = d * kPanel * static_cast<int64_t>(sizeof(float));
  const Search search{current_search_tile(), d, panels, norms, npanels,
                      std::max<int64_t>(1, kBlockBytes / panel_bytes)};
  const Outputs out{indices_out, sqdist_out, quantized_out};

  // Few row groups (e.g. N = 64, K = 65536) cannot keep every thread busy: split the codes too.
  const int64_t ngroups = (n + kGroupRows - 1) / kGroupRows;
  const int64_t want_items = 4 * static_cast<int64_t>(nt);
  const int64_t nchunks =
      nt > 1 && ngroups < want_items
          ? std::max<int64_t>(1, std::min((want_items + ngroups - 1) / ngroups, npanels / kMinChunkPanels))
          : 1;
  if (nchunks == 1)
    search_by_row_groups(search, x, n, codebook, out, nt);
  else
    search_by_code_chunks(search, x, n, codebook, nchunks, out, nt);
}

}  // namespace fastvq::cpu
