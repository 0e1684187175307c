// nearest_code: fused nearest-codebook search + squared distance + gather, without ever
// forming the N x K distance matrix.
//
//   1. Pack the codebook into panels of 16 codes holding -2*(e - c), plus ||e - c||^2, in the
//      centred frame of pack_codebook.h (or take the pack from its cache).
//   2. Search: for each group of rows, for each L2-sized block of panels, for each tile of
//      6 rows (x - c, packed), the SIMD micro-kernel folds ||e'||^2 - 2 x'.e' into a running
//      best per row.
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
// fastvq.reference.nearest_code (a non-finite distance counts as +inf). A finite code or row
// too far from the centre for float32 (pack_codebook.h: the supported range) raises
// std::invalid_argument (ValueError) naming it, never a silently different index.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/nearest_code_prefilter.h"
#include "cpu/pack_codebook.h"
#include "cpu/search_common.h"

namespace fastvq::cpu {
namespace {

struct Search {
  SearchTileFn tile;
  SearchFewRowsFn few_rows;  // may be null
  SearchTileFn rows18;       // three tiles at once; may be null
  int64_t d;
  const float* panels;
  const float* norms;
  const float* centre;
  int64_t npanels;
  int64_t block_panels;

  // The tiles of `nrows` packed rows against panels [q_begin, q_end), K-blocked, merged into
  // best_* (kTileRows entries per tile); a last tile of fewer rows computes only those.
  void tiles(const float* xpack, int64_t nrows, int64_t q_begin, int64_t q_end, float* best_val,
             int64_t* best_idx) const {
    const int64_t ntiles = (nrows + kTileRows - 1) / kTileRows;
    if (ntiles == 3 && rows18) {  // no K blocks: each panel is read once, by all the rows
      rows18(xpack, d, panels + q_begin * d * kPanel, norms + q_begin * kPanel, q_end - q_begin, q_begin * kPanel,
             best_val, best_idx);
      return;
    }
    const int last_rows = static_cast<int>(nrows - (ntiles - 1) * kTileRows);
    for (int64_t q0 = q_begin; q0 < q_end; q0 += block_panels) {
      const int64_t nq = std::min(block_panels, q_end - q0);
      for (int64_t t = 0; t < ntiles; ++t) {
        const float* xt = xpack + t * d * kTileRows;
        if (t == ntiles - 1 && last_rows < kTileRows && few_rows)
          few_rows(last_rows, xt, d, panels + q0 * d * kPanel, norms + q0 * kPanel, nq, q0 * kPanel,
                   best_val + t * kTileRows, best_idx + t * kTileRows);
        else
          tile(xt, d, panels + q0 * d * kPanel, norms + q0 * kPanel, nq, q0 * kPanel, best_val + t * kTileRows,
               best_idx + t * kTileRows);
      }
    }
  }
};

// Both schedules hand out work items dynamically, so a thread that loses its core (shared
// machines) does not hold up the others; no result depends on which thread runs which item.

// One work item per group of rows: search all codes, then finish the group's rows.
void search_by_row_groups(const Search& search, const float* x, int64_t n, const float* codebook,
                          const NearestCodeOutputs& out, int nt) {
  const int64_t d = search.d;
  const int64_t ngroups = (n + kGroupRows - 1) / kGroupRows;
  AlignedFloats xpack(static_cast<int64_t>(nt) * kGroupRows * d);
  std::vector<int64_t> bad_row(static_cast<size_t>(ngroups), -1);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t g = 0; g < ngroups; ++g) {
    const int64_t r0 = g * kGroupRows, r1 = std::min(n, r0 + kGroupRows);
    float* xp = xpack.ptr + thread_id() * kGroupRows * d;
    bad_row[static_cast<size_t>(g)] = pack_rows(x, d, r0, r1, search.centre, xp);
    if (bad_row[static_cast<size_t>(g)] >= 0) continue;  // raised below, outside the parallel region
    float best_val[kGroupRows];
    int64_t best_idx[kGroupRows];
    std::fill(best_val, best_val + kGroupRows, std::numeric_limits<float>::infinity());
    std::fill(best_idx, best_idx + kGroupRows, int64_t{-1});
    search.tiles(xp, r1 - r0, 0, search.npanels, best_val, best_idx);
    finish_rows(x, d, codebook, r0, r1, best_idx, out);
  }
  for (const int64_t row : bad_row)
    if (row >= 0) throw_row_out_of_range(x, d, row, search.centre);
}

// One work item per (row group, code chunk) pair, the codes split into `nchunks` contiguous
// chunks. Each chunk keeps its own running best per row; the chunks are merged afterwards in
// code order with the same strict rule, so ties still go to the lowest index.
void search_by_code_chunks(const Search& search, const float* x, int64_t n, const float* codebook,
                           int64_t nchunks, const NearestCodeOutputs& out, int nt) {
  const int64_t d = search.d, npanels = search.npanels;
  const int64_t ngroups = (n + kGroupRows - 1) / kGroupRows;
  const int64_t npad = ngroups * kGroupRows;  // few rows here: pack them all once
  AlignedFloats xpack(npad * d);
  const int64_t bad_row = pack_rows(x, d, 0, n, search.centre, xpack.ptr);
  if (bad_row >= 0) throw_row_out_of_range(x, d, bad_row, search.centre);
  std::vector<float> chunk_val(static_cast<size_t>(nchunks * npad), std::numeric_limits<float>::infinity());
  std::vector<int64_t> chunk_idx(static_cast<size_t>(nchunks * npad), -1);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t item = 0; item < ngroups * nchunks; ++item) {
    const int64_t g = item / nchunks, c = item % nchunks;
    const int64_t r0 = g * kGroupRows, r1 = std::min(n, r0 + kGroupRows);
    const int64_t q_begin = npanels * c / nchunks, q_end = npanels * (c + 1) / nchunks;
    search.tiles(xpack.ptr + r0 * d, r1 - r0, q_begin, q_end,
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
                  CacheKey cache_key, int64_t* indices_out, float* sqdist_out, float* quantized_out,
                  int num_threads, const int64_t* hint, CacheKey rows_key) {
  if (n == 0) return;
  const int64_t npanels = (k + kPanel - 1) / kPanel;
  const int nt = search_threads(num_threads, n, npanels, d);
  // Packing parallelises over codes whatever the rows, so it may use every thread.
  const std::shared_ptr<const PackedCodebook> pack = packed_codebook(codebook, k, d, cache_key, num_threads);

  const int64_t panel_bytes = d * kPanel * static_cast<int64_t>(sizeof(float));
  const Search search{current_search_tile(), current_search_few_rows(), current_search_rows18(), d, pack->panels,
                      pack->norms, pack->centre, npanels, std::max<int64_t>(1, kBlockBytes / panel_bytes)};
  const NearestCodeOutputs out{indices_out, sqdist_out, quantized_out};
  if (prefilter_reason(n, k, d).empty() && nearest_code_prefiltered(x, n, codebook, *pack, out, nt, hint, rows_key))
    return;
  const int64_t nchunks = code_chunks(nt, n, npanels);
  if (nchunks == 1)
    search_by_row_groups(search, x, n, codebook, out, nt);
  else
    search_by_code_chunks(search, x, n, codebook, nchunks, out, nt);
}

}  // namespace fastvq::cpu
