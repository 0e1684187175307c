// nearest_codes: each row's k nearest codes (k <= 64), fused, without the N x K matrix.
//
// The search of nearest_code.cpp (same centred pack, tiles, K blocks, threading, and the same
// float32 value for each (row, code) pair), with a top-k epilogue in the micro-kernels: each row
// keeps a sorted list of its k smallest (value, index) pairs, and a tile's scores are compared
// with the row's k-th value in SIMD; only the rare winners are inserted (kernels.h).
// Then each listed code's squared distance is computed directly, as in nearest_code.
//
// Determinism: the k smallest under the total order (value, index) are unique, and each value
// is computed by the same instructions whatever the threading, so results are identical for any
// thread count. Non-finite values follow fastvq.reference.nearest_codes: a distance that is NaN
// or +inf counts as +inf, so such codes come after every finite one, in index order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/pack_codebook.h"
#include "cpu/search_common.h"

namespace fastvq::cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct TopkSearch {
  SearchTileTopkFn tile;
  int64_t d;
  const float* panels;
  const float* norms;
  const float* centre;
  int64_t npanels;
  int64_t block_panels;
  int k;

  // `ntiles` packed tiles against panels [q_begin, q_end), K-blocked, into the rows' lists
  // (kTileRows lists of k per tile).
  void tiles(const float* xpack, int64_t ntiles, int64_t q_begin, int64_t q_end, float* list_val,
             int32_t* list_idx) const {
    for (int64_t q0 = q_begin; q0 < q_end; q0 += block_panels) {
      const int64_t nq = std::min(block_panels, q_end - q0);
      for (int64_t t = 0; t < ntiles; ++t)
        tile(xpack + t * d * kTileRows, d, panels + q0 * d * kPanel, norms + q0 * kPanel, nq, q0 * kPanel, k,
             list_val + t * kTileRows * k, list_idx + t * kTileRows * k);
    }
  }
};

struct Outputs {
  int64_t* indices;  // (n, k)
  float* sqdist;     // (n, k)
};

// Rows [r0, r1): their lists (row i's at (i - r0) * k) into outputs. A listed code whose direct
// distance is not finite (possible only for a row of x holding +-inf) leaves the list; the free
// places go to the lowest indices not listed, as the reference orders +inf distances.
void finish_rows(const float* x, int64_t d, const float* codebook, int k, int64_t r0, int64_t r1,
                 const int32_t* list_idx, const Outputs& out) {
  for (int64_t i = r0; i < r1; ++i) {
    const int32_t* list = list_idx + (i - r0) * k;
    int64_t* idx = out.indices + i * k;
    float* sq = out.sqdist + i * k;
    int m = 0;
    for (int j = 0; j < k && list[j] >= 0; ++j) {
      const float s = squared_l2(x + i * d, codebook + list[j] * d, d);
      if (!std::isfinite(s)) continue;
      idx[m] = list[j];
      sq[m++] = s;
    }
    const int listed = m;
    for (int64_t code = 0; m < k; ++code) {
      if (std::find(idx, idx + listed, code) != idx + listed) continue;
      idx[m] = code;
      sq[m++] = squared_l2(x + i * d, codebook + code * d, d);
    }
  }
}

// One work item per group of rows: search all codes, then finish the group's rows.
void search_by_row_groups(const TopkSearch& search, const float* x, int64_t n, const float* codebook,
                          const Outputs& out, int nt) {
  const int64_t d = search.d, k = search.k;
  const int64_t ngroups = (n + kGroupRows - 1) / kGroupRows;
  AlignedFloats xpack(static_cast<int64_t>(nt) * kGroupRows * d);
  std::vector<float> lists_val(static_cast<size_t>(nt * kGroupRows * k));
  std::vector<int32_t> lists_idx(static_cast<size_t>(nt * kGroupRows * k));
  std::vector<int64_t> bad_row(static_cast<size_t>(ngroups), -1);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t g = 0; g < ngroups; ++g) {
    const int64_t r0 = g * kGroupRows, r1 = std::min(n, r0 + kGroupRows);
    const int64_t t = thread_id();
    float* xp = xpack.ptr + t * kGroupRows * d;
    bad_row[static_cast<size_t>(g)] = pack_rows(x, d, r0, r1, search.centre, xp);
    if (bad_row[static_cast<size_t>(g)] >= 0) continue;  // raised below, outside the parallel region
    float* lv = lists_val.data() + t * kGroupRows * k;
    int32_t* li = lists_idx.data() + t * kGroupRows * k;
    std::fill(lv, lv + kGroupRows * k, kInf);
    std::fill(li, li + kGroupRows * k, int32_t{-1});
    search.tiles(xp, (r1 - r0 + kTileRows - 1) / kTileRows, 0, search.npanels, lv, li);
    finish_rows(x, d, codebook, search.k, r0, r1, li, out);
  }
  for (const int64_t row : bad_row)
    if (row >= 0) throw_row_out_of_range(x, d, row, search.centre);
}

// One work item per (row group, code chunk) pair; each chunk keeps its own lists, merged
// afterwards by (value, index), which is how the whole search would have ordered them.
void search_by_code_chunks(const TopkSearch& search, const float* x, int64_t n, const float* codebook,
                           int64_t nchunks, const Outputs& out, int nt) {
  const int64_t d = search.d, k = search.k, npanels = search.npanels;
  const int64_t ngroups = (n + kGroupRows - 1) / kGroupRows;
  const int64_t npad = ngroups * kGroupRows;  // few rows here: pack them all once
  AlignedFloats xpack(npad * d);
  const int64_t bad_row = pack_rows(x, d, 0, n, search.centre, xpack.ptr);
  if (bad_row >= 0) throw_row_out_of_range(x, d, bad_row, search.centre);
  std::vector<float> chunk_val(static_cast<size_t>(nchunks * npad * k), kInf);
  std::vector<int32_t> chunk_idx(static_cast<size_t>(nchunks * npad * k), -1);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t item = 0; item < ngroups * nchunks; ++item) {
    const int64_t g = item / nchunks, c = item % nchunks;
    const int64_t r0 = g * kGroupRows, r1 = std::min(n, r0 + kGroupRows);
    const int64_t q_begin = npanels * c / nchunks, q_end = npanels * (c + 1) / nchunks;
    search.tiles(xpack.ptr + r0 * d, (r1 - r0 + kTileRows - 1) / kTileRows, q_begin, q_end,
                 chunk_val.data() + (c * npad + r0) * k, chunk_idx.data() + (c * npad + r0) * k);
  }
  std::vector<int32_t> merged(static_cast<size_t>(n * k));
  std::vector<std::pair<float, int32_t>> candidates;
  for (int64_t i = 0; i < n; ++i) {
    candidates.clear();
    for (int64_t c = 0; c < nchunks; ++c)
      for (int64_t j = 0; j < k && chunk_idx[static_cast<size_t>((c * npad + i) * k + j)] >= 0; ++j)
        candidates.emplace_back(chunk_val[static_cast<size_t>((c * npad + i) * k + j)],
                                chunk_idx[static_cast<size_t>((c * npad + i) * k + j)]);
    const size_t keep = std::min<size_t>(static_cast<size_t>(k), candidates.size());
    std::partial_sort(candidates.begin(), candidates.begin() + static_cast<std::ptrdiff_t>(keep), candidates.end());
    for (int64_t j = 0; j < k; ++j)
      merged[static_cast<size_t>(i * k + j)] = static_cast<size_t>(j) < keep ? candidates[static_cast<size_t>(j)].second : -1;
  }
  finish_rows(x, d, codebook, search.k, 0, n, merged.data(), out);
}

}  // namespace

void nearest_codes(const float* x, int64_t n, int64_t d, const float* codebook, int64_t k, int topk,
                   CacheKey cache_key, int64_t* indices_out, float* sqdist_out, int num_threads) {
  if (n == 0) return;
  if (k > std::numeric_limits<int32_t>::max())  // the lists hold int32 codes (kernels.h)
    throw std::invalid_argument("codebook: nearest_codes supports at most 2^31 - 1 codes, got K = " +
                                std::to_string(k));
  const int64_t npanels = (k + kPanel - 1) / kPanel;
  const int nt = search_threads(num_threads, n, npanels, d);
  const std::shared_ptr<const PackedCodebook> pack = packed_codebook(codebook, k, d, cache_key, num_threads);

  const int64_t panel_bytes = d * kPanel * static_cast<int64_t>(sizeof(float));
  const TopkSearch search{current_search_tile_topk(), d, pack->panels, pack->norms, pack->centre, npanels,
                          std::max<int64_t>(1, kBlockBytes / panel_bytes), topk};
  const Outputs out{indices_out, sqdist_out};
  const int64_t nchunks = code_chunks(nt, n, npanels);
  if (nchunks == 1)
    search_by_row_groups(search, x, n, codebook, out, nt);
  else
    search_by_code_chunks(search, x, n, codebook, nchunks, out, nt);
}

}  // namespace fastvq::cpu
