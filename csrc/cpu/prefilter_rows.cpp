// The rows kept between searches of the same x (prefilter_rows.h).
#include "cpu/prefilter_rows.h"

#include <algorithm>
#include <mutex>

namespace fastvq::cpu {
namespace {

std::mutex& kept_mutex() {
  static std::mutex m;
  return m;
}

std::shared_ptr<const KeptRows>& kept_slot() {
  static std::shared_ptr<const KeptRows> kept;
  return kept;
}

size_t kept_bytes(const KeptRows& kept) {
  return kept.xq.size() * sizeof(int32_t) + kept.rows.size() * sizeof(RowLevels) + kept.centre.size() * sizeof(float);
}

}  // namespace

bool QuantizedBlock::quantize(const float* x, int64_t first, int64_t rows, const float* centre,
                              const QuantizedCodes& codes, const RowLayout& layout, int nt, KeptRows* keep) {
  r0 = first;
  if (!keep) xq.assign(static_cast<size_t>(layout.words((rows + kAmxRows - 1) / kAmxRows)), 0);  // 0 past d
  int32_t* levels = keep ? keep->xq.data() + layout.offset(first) : xq.data();
  base = levels;
  qrows.resize(static_cast<size_t>(rows));
  const int64_t nbatches = (rows + kRowBatch - 1) / kRowBatch;
  int64_t declined = 0;
#pragma omp parallel for schedule(static) num_threads(nt) reduction(+ : declined) if (nt > 1 && rows >= 256)
  for (int64_t b = 0; b < nbatches; ++b) {
    const int64_t i = b * kRowBatch, count = std::min<int64_t>(kRowBatch, rows - i);
    RowLevels own[kRowBatch];
    RowLevels* row_levels = keep ? &keep->rows[static_cast<size_t>(first + i)] : own;
    bool ok = true;
    for (int64_t j = 0; j < count && ok; ++j)
      ok = quantize_row_levels(*layout.kernels, x + (first + i + j) * codes.d, centre, codes.d, codes.d4,
                               levels + layout.offset(i + j), layout.stride(), row_levels[j]);
    declined += !(ok && bound_rows(row_levels, count, codes, &qrows[static_cast<size_t>(i)]));
  }
  return declined == 0;
}

bool QuantizedBlock::reuse(const KeptRows& kept, int64_t first, int64_t rows, const QuantizedCodes& codes) {
  r0 = first;
  base = kept.xq.data() + kept.layout.offset(first);
  qrows.resize(static_cast<size_t>(rows));
  for (int64_t i = 0; i < rows; i += kRowBatch)
    if (!bound_rows(&kept.rows[static_cast<size_t>(first + i)], std::min<int64_t>(kRowBatch, rows - i), codes,
                    &qrows[static_cast<size_t>(i)]))
      return false;
  return true;
}

std::shared_ptr<const KeptRows> find_kept_rows(CacheKey key, const float* centre, int64_t n, int64_t d,
                                               const RowLayout& layout) {
  if (key.size == 0) return nullptr;
  std::shared_ptr<const KeptRows> kept;
  {
    std::lock_guard<std::mutex> lock(kept_mutex());
    kept = kept_slot();
  }
  if (!kept || kept->n != n || kept->d != d || !(kept->layout == layout) ||
      !std::equal(key.data, key.data + key.size, kept->key.begin(), kept->key.end()) ||
      !std::equal(centre, centre + d, kept->centre.begin()))  // as floats: -0 == 0 gives the same x - c levels
    return nullptr;
  return kept;
}

std::shared_ptr<KeptRows> new_kept_rows(CacheKey key, int64_t n, int64_t d, const float* centre,
                                        const RowLayout& layout) {
  const int64_t ngroups = (n + kAmxRows - 1) / kAmxRows;
  const size_t bytes = static_cast<size_t>(layout.words(ngroups)) * sizeof(int32_t) +
                       static_cast<size_t>(n) * sizeof(RowLevels);
  if (key.size == 0 || bytes > kMaxKeptRowsBytes) return nullptr;
  auto kept = std::make_shared<KeptRows>();
  kept->key.assign(key.data, key.data + key.size);
  kept->centre.assign(centre, centre + d);
  kept->layout = layout;
  kept->n = n;
  kept->d = d;
  kept->xq.assign(static_cast<size_t>(layout.words(ngroups)), 0);  // 0 past d and past n
  kept->rows.resize(static_cast<size_t>(n));
  return kept;
}

void keep_rows(std::shared_ptr<const KeptRows> kept) {
  std::lock_guard<std::mutex> lock(kept_mutex());
  kept_slot().swap(kept);  // the rows kept before are freed outside the lock
}

size_t release_kept_rows(CacheKey key) {
  std::shared_ptr<const KeptRows> dropped;
  {
    std::lock_guard<std::mutex> lock(kept_mutex());
    const std::shared_ptr<const KeptRows>& kept = kept_slot();
    if (kept && std::equal(key.data, key.data + key.size, kept->key.begin(), kept->key.end()))
      dropped.swap(kept_slot());
  }
  return dropped ? kept_bytes(*dropped) : 0;
}

size_t empty_kept_rows() {
  std::shared_ptr<const KeptRows> dropped;
  {
    std::lock_guard<std::mutex> lock(kept_mutex());
    dropped.swap(kept_slot());
  }
  return dropped ? kept_bytes(*dropped) : 0;
}

}  // namespace fastvq::cpu
