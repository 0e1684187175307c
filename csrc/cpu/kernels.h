// Internal API of the CPU kernels (raw pointers, already validated arguments).
//
// This header is included by search_tile_avx2.cpp, which is compiled with -mavx2 -mfma:
// keep it to declarations and constants. An inline function defined here and used from
// both that file and a portable one could be emitted with AVX2 instructions and picked by
// the linker for the portable callers too.
#pragma once

#include <cstdint>

namespace fastvq::cpu {

// ---- codebook packing, shared by every SIMD level (pack_codebook.h) ----
// The codebook is packed (or taken from the pack cache) per call into panels of kPanel codes,
// in the centred frame of pack_codebook.h (c = the search centre; below, e means e - c):
//   panels[q][p][j] = -2 * codebook[q*kPanel + j][p]      (q < K_pad/kPanel, p < d, j < kPanel)
//   norms[q][j]     = ||codebook[q*kPanel + j]||^2
// Codes past K (padding up to a multiple of kPanel) have panels 0 and norm +inf, so they
// can never win. Scaling by -2 is exact, so acc = norm + sum_p x_p * panel_p equals
// ||e||^2 - 2 x.e up to the rounding of the additions.
constexpr int kPanel = 16;
// Rows per micro-kernel tile (6 rows x 16 codes = 12 ymm accumulators on AVX2).
constexpr int kTileRows = 6;

// Before the search, each tile of kTileRows rows of x is packed as xpack[p][r] = x[r][p] - c[p]
// (p < d, r < kTileRows), rows past N zero-filled, so the kernel broadcasts from one stream.
//
// Search one packed tile against `npanels` consecutive packed panels whose first code has
// global index `code_base`, and merge into the running best of each of the kTileRows rows:
// best_val[r], best_idx[r] are replaced only when a code of this range is strictly better.
// All codes of this call come after the codes already merged into best_*, so "strictly
// better" keeps the lowest index on ties. Within the call, ties also go to the lowest
// index. A distance that is NaN or +inf never replaces anything (see nearest_code.cpp).
// Fold per-lane bests into the rows' running bests: for each of `rows` rows, the lane with
// the smallest value (ties: smallest lane index) replaces best_*[r] only if strictly
// smaller. lane_idx holds code offsets from code_base. Defined in the portable translation
// unit; the AVX2 and AVX-512 kernels apply the same rule to lanes still in registers
// (merge_lanes_simd.h: two reductions instead of a branch per lane).
void merge_lanes(const float (*lane_val)[kPanel], const int32_t (*lane_idx)[kPanel], int rows,
                 int64_t code_base, float* best_val, int64_t* best_idx);

using SearchTileFn = void (*)(const float* xpack, int64_t d, const float* panels, const float* norms,
                              int64_t npanels, int64_t code_base, float* best_val, int64_t* best_idx);

void search_tile_portable(const float* xpack, int64_t d, const float* panels, const float* norms,
                          int64_t npanels, int64_t code_base, float* best_val, int64_t* best_idx);
#ifdef FASTVQ_HAVE_AVX2_KERNEL
void search_tile_avx2(const float* xpack, int64_t d, const float* panels, const float* norms,
                      int64_t npanels, int64_t code_base, float* best_val, int64_t* best_idx);
#endif
#ifdef FASTVQ_HAVE_AVX512_KERNEL
void search_tile_avx512(const float* xpack, int64_t d, const float* panels, const float* norms,
                        int64_t npanels, int64_t code_base, float* best_val, int64_t* best_idx);
#endif

// The last tile of a call may hold fewer than kTileRows rows (N = 1 for one streamed frame): this
// variant computes only its first `rows` rows (1 <= rows < kTileRows), with the same value for
// each (row, code) and the same selection as the full tile. Null where a level has none.
using SearchFewRowsFn = void (*)(int rows, const float* xpack, int64_t d, const float* panels, const float* norms,
                                 int64_t npanels, int64_t code_base, float* best_val, int64_t* best_idx);
#ifdef FASTVQ_HAVE_AVX2_KERNEL
void search_few_rows_avx2(int rows, const float* xpack, int64_t d, const float* panels, const float* norms,
                          int64_t npanels, int64_t code_base, float* best_val, int64_t* best_idx);
#endif
#ifdef FASTVQ_HAVE_AVX512_KERNEL
void search_few_rows_avx512(int rows, const float* xpack, int64_t d, const float* panels, const float* norms,
                            int64_t npanels, int64_t code_base, float* best_val, int64_t* best_idx);
#endif

// Three packed tiles at once (3 * kTileRows rows, best_val/best_idx of that many entries), each
// panel used by all of them as it arrives: for calls of 13-18 rows, where 6-row tiles would stream
// every K block from memory for the first tile and from L2 for the others. Same values and
// selection as the tile. Null where a level has none.
#ifdef FASTVQ_HAVE_AVX512_KERNEL
void search_rows18_avx512(const float* xpack, int64_t d, const float* panels, const float* norms,
                          int64_t npanels, int64_t code_base, float* best_val, int64_t* best_idx);
#endif
SearchTileFn current_search_rows18();

// ---- the top-k variant (nearest_codes) ----
// Same packing, tiles and accumulation as above (so a (row, code) value is bitwise the one
// nearest_code computes); the epilogue keeps, per row, a list of the k smallest (value, code)
// pairs seen so far, sorted by value, ties by code: list_val[r * k + j], list_idx[r * k + j]
// (j < k) for the kTileRows rows of the tile, unused slots +inf / -1. Codes are int32 (the
// driver checks K). Codes reach each row in increasing order (within a call and across calls),
// so a code enters only when its value is strictly below the row's k-th value, after the entries
// of equal value; NaN and +inf never enter. The SIMD kernels insert without branches in
// registers (search_tile_avx2.cpp, search_tile_avx512.cpp), the portable one with memmove.
using SearchTileTopkFn = void (*)(const float* xpack, int64_t d, const float* panels, const float* norms,
                                  int64_t npanels, int64_t code_base, int k, float* list_val, int32_t* list_idx);

void search_tile_topk_portable(const float* xpack, int64_t d, const float* panels, const float* norms,
                               int64_t npanels, int64_t code_base, int k, float* list_val, int32_t* list_idx);
#ifdef FASTVQ_HAVE_AVX2_KERNEL
void search_tile_topk_avx2(const float* xpack, int64_t d, const float* panels, const float* norms,
                           int64_t npanels, int64_t code_base, int k, float* list_val, int32_t* list_idx);
#endif
#ifdef FASTVQ_HAVE_AVX512_KERNEL
void search_tile_topk_avx512(const float* xpack, int64_t d, const float* panels, const float* norms,
                             int64_t npanels, int64_t code_base, int k, float* list_val, int32_t* list_idx);
#endif

// ---- run-time SIMD dispatch (simd.cpp) ----
enum class SimdLevel : int { portable = 0, avx2 = 1, avx512 = 2 };
const char* simd_level_name(SimdLevel level);
SimdLevel best_simd_level();     // the highest level this CPU and this build support
SimdLevel current_simd_level();  // what the dispatcher picks now
// Accepts "portable", "avx2", "avx512" or "auto" (= best); throws std::invalid_argument for an unknown
// name or a level this CPU/build cannot run.
void set_simd_level(const char* name);
SearchTileFn current_search_tile();
SearchTileTopkFn current_search_tile_topk();
SearchFewRowsFn current_search_few_rows();

// ---- threading ----
bool openmp_enabled();
int max_threads();
int resolve_threads(int num_threads);  // <= 0 -> OpenMP default; always >= 1

// ---- ops (arguments validated by the caller; indices already checked to be in [0, K)) ----
// What identifies the caller's codebook tensor for the pack cache (pack_codebook.h: packed_codebook);
// size 0: never look up a cached pack.
struct CacheKey {
  const int64_t* data = nullptr;
  int64_t size = 0;
};

void nearest_code(const float* x, int64_t n, int64_t d, const float* codebook, int64_t k, CacheKey cache_key,
                  int64_t* indices_out, float* sqdist_out, float* quantized_out, int num_threads,
                  const int64_t* hint = nullptr, CacheKey rows_key = {});

// indices_out / sqdist_out (n, topk): each row's topk nearest codes, nearest first, ties to the
// lower index; non-finite distances count as +inf (they fill the list last, in index order).
void nearest_codes(const float* x, int64_t n, int64_t d, const float* codebook, int64_t k, int topk,
                   CacheKey cache_key, int64_t* indices_out, float* sqdist_out, int num_threads);

// k-means++'s block acceptance (fastvq/kmeans_seeding.py: _accept): proposal i (of `count`, pool row
// pool_rows[i]) is kept when uniform[i] * old[i] < current[i], current starting at old and lowered, for each
// kept proposal i, to sqdist(i, j) = (norms[i] + norms[j]) - 2 gram[i][j] (0 for the same pool row) for
// the later proposals j; at most `block` kept. Writes their indices, returns how many.
int64_t kmeanspp_accept(const double* gram, const double* norms, const int64_t* pool_rows, const double* uniform,
                        const double* old, int64_t count, int64_t block, int64_t* kept_out);

// vqp's stochastic_sample_codes: argmin_k of -logit - float32(T * Gumbel(hash(seed, i, k))), ties to the
// lowest k; the hash is fastvq/reference.py's sample_noise. Source: csrc/cpu/sample_code.cpp.
void sample_code(const float* x, int64_t n, int64_t d, const float* codebook, int64_t k, double temperature,
                 int64_t seed, bool cosine, int64_t* indices_out, int num_threads);

// One level of ResidualVQ's greedy backward in one pass (csrc/cpu/residual_level_backward.cpp): grad_x
// (accumulate: +=) quantize_backward's grad_x of (grad_quantized, residual, ...); with advance, residual -=
// codebook[indices] in place except on the rotation trick's possibly tiny rows, flagged in tiny_out (N,).
void residual_level_backward(const float* grad_quantized, float* residual, int64_t n, int64_t d,
                             const float* codebook, int64_t k, const int64_t* indices, float commit_scale,
                             bool rotation_trick, bool accumulate, bool advance, float* grad_x, uint8_t* tiny_out,
                             int num_threads);

void ema_stats(const float* x, int64_t n, int64_t d, const int64_t* indices, int64_t k,
               float* counts_out, float* sums_out, int num_threads);

// grad_x = G + commit_scale (x - e_idx), G = grad_quantized (null: 0) or, with rotation_trick, the
// rotation trick's s R^T grad_quantized (see quantize_backward.cpp); grad_codebook as always.
void quantize_backward(const float* grad_quantized, const float* x, int64_t n, int64_t d,
                       const float* codebook, int64_t k, const int64_t* indices,
                       float commit_scale, float codebook_scale, bool rotation_trick,
                       float* grad_x_out, float* grad_codebook_out, int num_threads);

}  // namespace fastvq::cpu
