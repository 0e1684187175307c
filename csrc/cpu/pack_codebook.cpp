// Packing the codebook in the centred frame, and the bounded cache of packs (pack_codebook.h).
#include "cpu/pack_codebook.h"

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <list>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>

#include "cpu/kernels.h"
#include "cpu/large_buffer.h"
#include "cpu/search_common.h"

namespace fastvq::cpu {
namespace {

// Codes per chunk of the centre's partial sums: a fixed split, so the sums are the same for
// any thread count.
constexpr int64_t kCentreChunk = 1024;
// Packing is O(K d); below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelPackElements = int64_t{1} << 18;

bool all_finite(const float* v, int64_t d) {
  bool finite = true;
  for (int64_t p = 0; p < d; ++p) finite &= std::isfinite(v[p]);
  return finite;
}

// The centre, and which codes are finite (finite[i] = 1).
void centre_and_finite(const float* codebook, int64_t k, int64_t d, float* centre, std::vector<uint8_t>& finite,
                       int nt) {
  const int64_t nchunks = (k + kCentreChunk - 1) / kCentreChunk;
  finite.assign(static_cast<size_t>(k), 0);
  std::vector<double> partial(static_cast<size_t>(nchunks * d), 0.0);
  std::vector<int64_t> counts(static_cast<size_t>(nchunks), 0);
  const bool parallel = k * d >= kParallelPackElements;
#pragma omp parallel for schedule(static) num_threads(nt) if (parallel)
  for (int64_t c = 0; c < nchunks; ++c) {
    double* sum = partial.data() + c * d;
    for (int64_t i = c * kCentreChunk; i < std::min(k, (c + 1) * kCentreChunk); ++i) {
      const float* e = codebook + i * d;
      if (!all_finite(e, d)) continue;
      finite[static_cast<size_t>(i)] = 1;
      ++counts[static_cast<size_t>(c)];
      for (int64_t p = 0; p < d; ++p) sum[p] += e[p];
    }
  }
  int64_t count = 0;
  std::vector<double> mean(static_cast<size_t>(d), 0.0);
  for (int64_t c = 0; c < nchunks; ++c) {
    count += counts[static_cast<size_t>(c)];
    for (int64_t p = 0; p < d; ++p) mean[static_cast<size_t>(p)] += partial[static_cast<size_t>(c * d + p)];
  }
  if (count == 0) {
    std::fill(centre, centre + d, 0.0f);
    return;
  }
  for (double& m : mean) m /= static_cast<double>(count);
  std::fill(partial.begin(), partial.end(), 0.0);
#pragma omp parallel for schedule(static) num_threads(nt) if (parallel)
  for (int64_t c = 0; c < nchunks; ++c) {
    double* sum = partial.data() + c * d;
    for (int64_t i = c * kCentreChunk; i < std::min(k, (c + 1) * kCentreChunk); ++i) {
      if (!finite[static_cast<size_t>(i)]) continue;
      const float* e = codebook + i * d;
      for (int64_t p = 0; p < d; ++p) {
        const double t = e[p] - mean[static_cast<size_t>(p)];
        sum[p] += t * t;
      }
    }
  }
  for (int64_t p = 0; p < d; ++p) {
    double var = 0.0;
    for (int64_t c = 0; c < nchunks; ++c) var += partial[static_cast<size_t>(c * d + p)];
    const double s = std::sqrt(var / static_cast<double>(count));
    const double m = mean[static_cast<size_t>(p)];
    if (s > 0.0) {
      int exponent = 0;
      const double mantissa = std::frexp(s, &exponent);  // s = mantissa 2^exponent, mantissa in [0.5, 1)
      const double grid = std::ldexp(1.0, mantissa == 0.5 ? exponent - 1 : exponent);  // 2^ceil(log2 s)
      centre[p] = static_cast<float>(grid * std::nearbyint(m / grid));
    } else {
      centre[p] = static_cast<float>(m);
    }
  }
}

std::string format_double(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3g", v);
  return buf;
}

std::string range_text() {
  return "the float32 search supports ||v - c||^2 <= FLT_MAX/8 = " + format_double(kMaxCentredSquaredNorm) +
         " (||v - c|| <= " + format_double(std::sqrt(kMaxCentredSquaredNorm)) +
         ") for every finite code and row, where c is the per-dimension centre of the finite codes "
         "(fastvq.numerics.search_centre)";
}

// Fill `out` (capacity already enough) with the centred pack of the codebook.
void pack_into(const float* codebook, int64_t k, int64_t d, PackedCodebook& out, int nt) {
  std::vector<uint8_t> finite;
  centre_and_finite(codebook, k, d, out.centre, finite, nt);
  const float* centre = out.centre;
  const int64_t npanels = out.npanels;
  std::vector<int64_t> bad(static_cast<size_t>(npanels), -1);  // first out-of-range finite code per panel
  std::vector<double> bad_norm(static_cast<size_t>(npanels), 0.0);
#pragma omp parallel for schedule(static) num_threads(nt) if (k * d >= kParallelPackElements)
  for (int64_t q = 0; q < npanels; ++q) {
    float* dst = out.panels + q * d * kPanel;
    const int64_t valid = std::min<int64_t>(kPanel, k - q * kPanel);
    const float* e = codebook + q * kPanel * d;
    // Transpose with the exact scaling by -2; codes past K get 0 (their +inf norm decides).
    for (int64_t p = 0; p < d; ++p) {
      float* row = dst + p * kPanel;
      for (int j = 0; j < valid; ++j) row[j] = -2.0f * (e[j * d + p] - centre[p]);
      for (int j = static_cast<int>(valid); j < kPanel; ++j) row[j] = 0.0f;
    }
    for (int j = 0; j < kPanel; ++j) {
      if (j >= valid) {
        out.norms[q * kPanel + j] = std::numeric_limits<float>::infinity();
        continue;
      }
      // ||e - c||^2 in double, 4 partial sums in a fixed order, of the same float32 centred values.
      double acc[4] = {0.0, 0.0, 0.0, 0.0};
      for (int64_t p = 0; p < d; ++p) {
        const double t = static_cast<float>(e[j * d + p] - centre[p]);
        acc[p & 3] += t * t;
      }
      const double norm = (acc[0] + acc[1]) + (acc[2] + acc[3]);
      out.norms[q * kPanel + j] = static_cast<float>(norm);
      if (!(norm <= kMaxCentredSquaredNorm) && finite[static_cast<size_t>(q * kPanel + j)] &&
          bad[static_cast<size_t>(q)] < 0) {
        bad[static_cast<size_t>(q)] = q * kPanel + j;
        bad_norm[static_cast<size_t>(q)] = norm;
      }
    }
  }
  for (int64_t q = 0; q < npanels; ++q)
    if (bad[static_cast<size_t>(q)] >= 0)
      throw std::invalid_argument("codebook row " + std::to_string(bad[static_cast<size_t>(q)]) +
                                  " is too far from the search centre: ||e - c||^2 = " +
                                  format_double(bad_norm[static_cast<size_t>(q)]) + "; " + range_text());
}

// The cache: most recently used first. An entry whose use_count() is 1 is idle (only the cache
// holds it) and may be evicted or have its buffer reused for another pack.
struct PackCache {
  std::mutex mutex;
  std::list<std::shared_ptr<PackedCodebook>> entries;

  // Evict idle entries after the first, least recently used first, down to the bounds (entries in
  // use by a running call count towards the bytes but stay until that call ends), and any older
  // entry with the first one's `key` (the same key packed by a concurrent call).
  void evict_locked(const std::vector<int64_t>* key) {
    size_t total = bytes_locked();
    size_t count = entries.size();
    std::vector<std::list<std::shared_ptr<PackedCodebook>>::iterator> older;
    for (auto it = std::next(entries.begin()); it != entries.end(); ++it) older.push_back(it);
    for (auto r = older.rbegin(); r != older.rend(); ++r) {
      const auto it = *r;
      const bool over = total > kPackCacheBytes || count > kPackCacheEntries;
      const bool stale_twin = key && !key->empty() && (*it)->key == *key;
      if ((over || stale_twin) && it->use_count() == 1) {
        total -= (*it)->capacity_bytes + (*it)->quantized_bytes.load();
        --count;
        entries.erase(it);
      }
    }
  }

  size_t bytes_locked() const {
    size_t total = 0;
    for (const auto& e : entries) total += e->capacity_bytes + e->quantized_bytes.load();
    return total;
  }
};

PackCache& cache() {
  static PackCache* instance = new PackCache();  // never destroyed: packs may outlive static teardown
  return *instance;
}

std::shared_ptr<PackedCodebook> allocate(size_t bytes) {
  auto pack = std::make_shared<PackedCodebook>();
  pack->panels = static_cast<float*>(allocate_large(bytes));
  pack->capacity_bytes = large_buffer_bytes(bytes);
  return pack;
}

}  // namespace

PackedCodebook::~PackedCodebook() { std::free(panels); }

void search_centre(const float* codebook, int64_t k, int64_t d, float* centre, int num_threads) {
  std::vector<uint8_t> finite;
  centre_and_finite(codebook, k, d, centre, finite, resolve_threads(num_threads));
}

std::shared_ptr<const PackedCodebook> packed_codebook(const float* codebook, int64_t k, int64_t d,
                                                      CacheKey cache_key, int num_threads) {
  const std::vector<int64_t> key(cache_key.data, cache_key.data + cache_key.size);
  const int64_t npanels = (k + kPanel - 1) / kPanel;
  const size_t panel_bytes = round_up64(static_cast<size_t>(npanels * d * kPanel) * sizeof(float));
  const size_t norm_bytes = round_up64(static_cast<size_t>(npanels * kPanel) * sizeof(float));
  const size_t bytes = panel_bytes + norm_bytes + round_up64(static_cast<size_t>(d) * sizeof(float));
  PackCache& c = cache();
  std::shared_ptr<PackedCodebook> pack;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    if (!key.empty())
      for (auto it = c.entries.begin(); it != c.entries.end(); ++it)
        if ((*it)->key == key && (*it)->k == k && (*it)->d == d) {
          c.entries.splice(c.entries.begin(), c.entries, it);
          c.entries.front()->cache_hits.fetch_add(1, std::memory_order_relaxed);
          return c.entries.front();
        }
    // Reuse an idle buffer that fits (no fresh mapping and page faults per call): the smallest one
    // without a key, else, when the cache is full, the least recently used keyed one.
    auto best = c.entries.end();
    for (auto it = c.entries.begin(); it != c.entries.end(); ++it)
      if (it->use_count() == 1 && (*it)->key.empty() && (*it)->capacity_bytes >= bytes &&
          (best == c.entries.end() || (*it)->capacity_bytes < (*best)->capacity_bytes))
        best = it;
    const bool full = c.entries.size() >= kPackCacheEntries || c.bytes_locked() + bytes > kPackCacheBytes;
    for (auto it = c.entries.rbegin(); best == c.entries.end() && full && it != c.entries.rend(); ++it)
      if (it->use_count() == 1 && (*it)->capacity_bytes >= bytes) best = std::prev(it.base());
    if (best != c.entries.end()) {
      pack = *best;
      c.entries.erase(best);
    }
  }
  if (!pack) pack = allocate(bytes);
  pack->key.clear();
  {  // a reused buffer drops the int8 copy of what it held
    std::lock_guard<std::mutex> lock(pack->quantized_mutex);
    pack->quantized.reset();
    pack->quantized_bytes.store(0);
    pack->cache_hits.store(0);
  }
  pack->k = k;
  pack->d = d;
  pack->npanels = npanels;
  pack->norms = reinterpret_cast<float*>(reinterpret_cast<char*>(pack->panels) + panel_bytes);
  pack->centre = reinterpret_cast<float*>(reinterpret_cast<char*>(pack->norms) + norm_bytes);
  pack_into(codebook, k, d, *pack, resolve_threads(num_threads));
  pack->key = key;
  if (pack->capacity_bytes > kPackCacheBytes) return pack;  // too large to keep
  std::lock_guard<std::mutex> lock(c.mutex);
  c.entries.push_front(pack);
  c.evict_locked(&key);
  return pack;
}

void trim_pack_cache() {
  PackCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.evict_locked(nullptr);
}

size_t empty_pack_cache() {
  PackCache& c = cache();
  std::list<std::shared_ptr<PackedCodebook>> dropped;
  size_t released = 0;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    for (const auto& e : c.entries)
      if (e.use_count() == 1) released += e->capacity_bytes + e->quantized_bytes.load();
    dropped.swap(c.entries);
  }
  return released;  // `dropped` frees the idle buffers here, outside the lock
}

size_t pack_cache_bytes() {
  PackCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return c.bytes_locked();
}

namespace {

// A whole tile's rows, dst[p * 6 + r] = x_r[p] - c[p]: four dimensions of the six rows at a time, transposed
// in registers, so each tile line is written by two stores instead of six (SSE2, in every x86-64 build).
// Returns the first dimension it left to the caller.
int64_t pack_full_tile(const float* x, int64_t d, const float* centre, float* dst) {
  int64_t p = 0;
#if defined(__SSE2__)
  static_assert(kTileRows == 6, "the transpose below is written for 6 rows");
  for (; p + 4 <= d; p += 4) {
    const __m128 c = _mm_loadu_ps(centre + p);
    __m128 r0 = _mm_sub_ps(_mm_loadu_ps(x + p), c), r1 = _mm_sub_ps(_mm_loadu_ps(x + d + p), c);
    __m128 r2 = _mm_sub_ps(_mm_loadu_ps(x + 2 * d + p), c), r3 = _mm_sub_ps(_mm_loadu_ps(x + 3 * d + p), c);
    const __m128 r4 = _mm_sub_ps(_mm_loadu_ps(x + 4 * d + p), c), r5 = _mm_sub_ps(_mm_loadu_ps(x + 5 * d + p), c);
    _MM_TRANSPOSE4_PS(r0, r1, r2, r3);  // r_j: dimension p + j of rows 0-3
    const __m128 low = _mm_unpacklo_ps(r4, r5), high = _mm_unpackhi_ps(r4, r5);  // rows 4, 5 of p, p + 1 | p + 2, p + 3
    float* out = dst + p * kTileRows;
    _mm_storeu_ps(out, r0);
    _mm_storel_pi(reinterpret_cast<__m64*>(out + 4), low);
    _mm_storeu_ps(out + 6, r1);
    _mm_storeh_pi(reinterpret_cast<__m64*>(out + 10), low);
    _mm_storeu_ps(out + 12, r2);
    _mm_storel_pi(reinterpret_cast<__m64*>(out + 16), high);
    _mm_storeu_ps(out + 18, r3);
    _mm_storeh_pi(reinterpret_cast<__m64*>(out + 22), high);
  }
#else
  (void)x, (void)centre, (void)dst;
#endif
  return p;
}

}  // namespace

int64_t pack_rows(const float* x, int64_t d, int64_t r0, int64_t r1, const float* centre, float* dst) {
  int64_t first_bad = -1;
  for (int64_t t0 = r0; t0 < r1; t0 += kTileRows, dst += d * kTileRows) {
    const int64_t packed = t0 + kTileRows <= r1 ? pack_full_tile(x + t0 * d, d, centre, dst) : 0;
    for (int r = 0; r < kTileRows; ++r) {
      const int64_t row = t0 + r;
      if (row < r1) {
        const float* src = x + row * d;
        for (int64_t p = packed; p < d; ++p) dst[p * kTileRows + r] = src[p] - centre[p];
        // A float32 sum errs far less than the margin below FLT_MAX; inf is out of range too. Eight
        // partial sums, not one chain: one chain's add latency cost more than the row's search at small K.
        const float norm = squared_l2(src, centre, d);
        if (first_bad < 0 && !(norm <= static_cast<float>(kMaxCentredSquaredNorm)) && !std::isnan(norm) &&
            all_finite(src, d))
          first_bad = row;
      } else {
        for (int64_t p = 0; p < d; ++p) dst[p * kTileRows + r] = 0.0f;
      }
    }
  }
  return first_bad;
}

void throw_row_out_of_range(const float* x, int64_t d, int64_t row, const float* centre) {
  double norm = 0.0;
  for (int64_t p = 0; p < d; ++p) {
    const double t = static_cast<double>(x[row * d + p]) - centre[p];
    norm += t * t;
  }
  throw std::invalid_argument("x row " + std::to_string(row) + " is too far from the search centre: ||x - c||^2 = " +
                              format_double(norm) + "; " + range_text());
}

}  // namespace fastvq::cpu
