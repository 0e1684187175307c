// nearest_code through the int8 prefilter (prefilter.h): quantize the rows, scan the int8 codes for
// candidates (AMX tiles, AVX-512 VNNI or AVX2), then score only the candidates with the search kernels'
// float32 arithmetic and finish the rows as the full search does. The outputs are bitwise the full
// search's.
//
// Work items as in nearest_code.cpp: groups of kScanGroupRows rows, and for few groups the codes in
// chunks too (each chunk keeps its own running minima and candidates; the rows are finished after,
// taking the chunks in code order). A row whose candidates overflow is scored over every panel.
#include "cpu/nearest_code_prefilter.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "cpu/int8_speed.h"
#include "cpu/kernels.h"
#include "cpu/prefilter_codes.h"
#include "cpu/prefilter_rows.h"
#include "cpu/search_common.h"

namespace fastvq::cpu {
namespace {

// Candidates one row may collect in one chunk before it is searched in full instead. Random data
// keeps a handful once the warm-up has set the running minimum.
constexpr int64_t kCandidateCap = 256;
// Panels scanned for the minimum alone before a row's first candidates (prefilter.h: warmup), per kernel
// set (PrefilterKernels::warmup_panels). Each code listed costs a mispredicted branch. VNNI, on the Xeon: 16
// panels (256 codes) listed 5.6 codes a row instead of 9.1 with 4 at 32768 x 1024 x 64, and took the scan
// from 1.20x to 1.37x the float32 search (same process); their S~ are kept, not recomputed: 1.03-1.09x at
// 32768 x 1024 x 64 (same-process A/B, same lists); 32 and 64 were tried and dropped in an earlier round,
// before the S~ were kept. VNNI, on the Zen 5 (same process, medians of 15): 64 panels against 16 at 32768 x
// 1024 x 64 7.66 -> 6.68 and 7.99 -> 6.99 ms, 16384 x 1024 x 256 13.9 -> 12.4, 12000 x 1024 x 128 5.04 ->
// 4.45, 32768 x 2048 x 32 9.14 -> 8.25, 2048 x 16384 x 256 15.2 -> 14.7, 4096 x 8192 x 64 4.28 -> 4.12 ms;
// 16384 x 16384 x 64, 8192 x 65536 x 32 and streaming within +-1 %; 128 panels gained 0-7 % more at
// K >= 2048 and lost 2 % at 2048 x 16384 x 256. The AMX scan (the VNNI set's rows, 32 at a time) keeps 16,
// as measured on the Xeon (kAmxWarmupPanels).
// AVX2, on the Zen 3 (same process, medians of 15-25): 48 panels against 16 listed 5.0 codes a row instead
// of 7.5 at 32768 x 1024 x 64, 27.1 -> 25.2 and 26.0 -> 24.2 ms (32 panels: 25.0); at 12000 x 1024 x 128
// 20.2 -> 19.5 ms, at 16384 x 16384 x 64 and 8192 x 65536 x 32 within +-2 %, streaming K = 65536 the same.
// An item's groups scan one block of panels after another, so a block read from memory serves
// every group of the item from L2 (~128 KiB of int8 codes).
constexpr int64_t kScanBlockBytes = 128 * 1024;
// The driver's groups of rows: what one AMX scan call takes, four VNNI or AVX2 scan calls.
constexpr int64_t kScanGroupRows = kAmxRows;
// Groups per work item when the codes are not split (64 rows).
constexpr int64_t kGroupsPerItem = 2;
// Calls of fewer rows scan with VNNI under "auto" (streaming: a frame or a few tokens at a time): an AMX
// tile multiplies 16 rows whatever the count. Same process on the 2-core Xeon (model 207), AMX time over
// VNNI time, each call after a faiss and a torch.cdist call, medians of 50 (two runs): K = 65536, d = 64:
// 1.06 / 1.02 at 1 / 2 rows, 1.25 at 4, 1.2 at 6, ~1 at 8, 0.9-1.1 at 12, 0.8 at 16; K = 16384, d = 64:
// 1.23 / 1.12 at 1 / 2, 1.3 at 4, ~1 at 8 and 12, 0.9 at 16; K = 65536, d = 32 (half-filled tiles): 1.55 /
// 1.48 at 1 / 2, 1.5 at 4, 1.4 at 8, 1.2 at 12, ~1 at 16 to 32; K = 4096, d = 128: 1.21 / 1.15 at 1 / 2,
// ~1.1 at 4 and 8, 0.9 at 12.
constexpr int64_t kAmxMinRows = 12;
// Hinted calls of at least this many rows keep their quantized rows for the next call (prefilter_rows.h).
constexpr int64_t kKeepRowsMinRows = 1024;

enum class Mode : int { automatic = 0, always = 1, off = 2 };
std::atomic<int>& mode_state() {
  static std::atomic<int> mode{static_cast<int>(Mode::automatic)};
  return mode;
}

enum class Kernel : int { automatic = 0, vnni = 1, amx = 2, avx2 = 3 };
std::atomic<int>& kernel_state() {
  static std::atomic<int> kernel{static_cast<int>(Kernel::automatic)};
  return kernel;
}

// AMX-INT8 usable: the CPU has it and Linux granted this process the tile data state.
bool amx_ready() {
#if defined(FASTVQ_HAVE_AMX_KERNEL) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
  static const bool ready = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8")) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // arch_prctl(ARCH_REQ_XCOMP_PERM, ...)
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ready;
#else
  return false;
#endif
}

std::atomic<int64_t> calls_prefiltered{0}, rows_in_full{0}, calls_declined{0}, codes_kept{0}, candidates{0},
    calls_deferred{0}, calls_amx{0}, calls_kept_rows{0};

bool cpu_has_vnni() {
#if defined(FASTVQ_HAVE_AVX512_VNNI_KERNEL) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

bool cpu_has_avx2() { return best_simd_level() >= SimdLevel::avx2; }

#ifdef FASTVQ_HAVE_AVX512_VNNI_KERNEL
const PrefilterKernels kVnniKernels{"vnni",
                                    127,
                                    kVnniWarmupPanels,
                                    kVnniScanRows,
                                    &prefilter_quantize_panel_avx512,
                                    &prefilter_max_abs_avx512,
                                    &prefilter_levels_avx512,
                                    &prefilter_scan_avx512,
                                    &prefilter_rescore_avx2};
#endif
#ifdef FASTVQ_HAVE_AVX2_KERNEL
const PrefilterKernels kAvx2Kernels{"avx2",
                                    kAvx2MaxLevel,
                                    kAvx2WarmupPanels,
                                    kPrefilterRows,
                                    &prefilter_quantize_panel_avx2,
                                    &prefilter_max_abs_avx2,
                                    &prefilter_levels_avx2,
                                    &prefilter_scan_avx2,
                                    &prefilter_rescore_avx2};
#endif

// The scan's kernel set now: VNNI (or its AMX twin) at SIMD level avx512 where the CPU has it, unless the
// AVX2 scan is asked for; the AVX2 scan at level avx2 (the level caps the ISA), or at level avx512 when asked
// for. At level avx512 without VNNI "auto" runs the AVX-512 float32 search (not measured, no such machine
// here: its tile does twice the AVX2 tile's FMAs per instruction, about what the AVX2 scan gains over the
// AVX2 tile at large shapes, 1.6-1.8x on Zen 3). Null: no int8 scan.
const PrefilterKernels* scan_kernels() {
  const SimdLevel level = current_simd_level();
  const Kernel choice = static_cast<Kernel>(kernel_state().load());
#ifdef FASTVQ_HAVE_AVX512_VNNI_KERNEL
  static const bool vnni = cpu_has_vnni();
  if (vnni && level == SimdLevel::avx512 && choice != Kernel::avx2) return &kVnniKernels;
#endif
#ifdef FASTVQ_HAVE_AVX2_KERNEL
  if (level == SimdLevel::avx2 || (level == SimdLevel::avx512 && choice == Kernel::avx2)) return &kAvx2Kernels;
#endif
  (void)level, (void)choice;
  return nullptr;
}

bool is_vnni(const PrefilterKernels* kernels) {
#ifdef FASTVQ_HAVE_AVX512_VNNI_KERNEL
  return kernels == &kVnniKernels;
#else
  (void)kernels;
  return false;
#endif
}

// "auto"'s thresholds for this kernel set (and, for VNNI, this CPU's int8 products' speed).
const AutoThresholds& auto_thresholds(const PrefilterKernels* kernels) {
  if (!is_vnni(kernels)) return kAvx2Auto;
  return int8_product_ratio() >= kWideInt8Ratio ? kVnniWideAuto : kVnniAuto;
}

// One (row group, code chunk) scan: its rows' running minima, candidate counts and candidates, the
// buffers sized for `rows` rows (a one-row call, streaming, allocates 2 KiB, not a group's 64 KiB) and
// not zero-filled: a scan writes count[r] of them before they are read. (A 16-row call has 8 chunks:
// std::vector's zero fill of their 256 KiB, with the score buffers', was 2 % of it by perf.)
struct ScanSlot {
  float running[kScanGroupRows * 16];
  int64_t count[kScanGroupRows];
  std::unique_ptr<int32_t[]> cand;
  std::unique_ptr<float[]> cand_val;
  explicit ScanSlot(int64_t rows)
      : cand(new int32_t[rows * kCandidateCap]), cand_val(new float[rows * kCandidateCap]) {}
  void reset() {
    std::fill(running, running + kScanGroupRows * 16, std::numeric_limits<float>::infinity());
    std::fill(count, count + kScanGroupRows, int64_t{0});
  }
};

// A thread's buffers for finishing a group.
struct GroupScratch {
  std::vector<float> centred;  // the group's rows, x - c
  std::vector<float> best_val;
  std::vector<int64_t> best_idx;
  std::vector<int32_t> rows, codes;  // the candidates to score: (row in the group, code), room for all listed
  AlignedFloats tile;                // one row as a packed tile, for a row searched in full
  explicit GroupScratch(int64_t d)
      : centred(static_cast<size_t>(kScanGroupRows * d)), best_val(kScanGroupRows), best_idx(kScanGroupRows),
        tile(d * kTileRows) {}
};

// What a call adds to prefilter_stats, published only when it answers.
struct CallStats {
  int64_t rows_in_full = 0, codes_kept = 0, candidates = 0;
  void add(const CallStats& o) {
    rows_in_full += o.rows_in_full;
    codes_kept += o.codes_kept;
    candidates += o.candidates;
  }
};

struct Prefiltered {
  const float* x;
  const float* codebook;
  const PackedCodebook& pack;
  const QuantizedCodes& codes;
  const RowLayout& layout;
  int64_t n;
  SearchFewRowsFn few_rows;
  const PrefilterKernels& kernels;
  const int64_t* hint;  // a code per row to start its running minimum from, or null (nearest_code_prefiltered)

  int64_t group_rows(int64_t g) const { return std::min<int64_t>(kScanGroupRows, n - g * kScanGroupRows); }

  // Groups [g0, g1) against panels [q_begin, q_end), block by block; slot(g) is group g's state. carried:
  // null, or each row's smallest S~ among codes scanned before (another chunk's), its running minimum's
  // start: like a hint's, it is some code's S~, so the codes listed stay a superset of those the bound
  // lets through, and the warm-up is skipped.
  template <typename SlotOf>
  void scan_groups(const QuantizedBlock& block_rows, int64_t g0, int64_t g1, int64_t q_begin, int64_t q_end,
                   SlotOf slot, const float* carried = nullptr) const {
    for (int64_t g = g0; g < g1; ++g) {
      ScanSlot& s = slot(g);
      s.reset();
      if (hint) start_from_hints(block_rows, g, s);
      if (carried)
        for (int64_t r = 0; r < group_rows(g); ++r)
          for (int64_t lane = 0; lane < 16; ++lane)
            s.running[r * 16 + lane] = std::min(s.running[r * 16 + lane], carried[g * kScanGroupRows + r]);
    }
    const int64_t warmup_panels = layout.amx ? kAmxWarmupPanels : kernels.warmup_panels;
    const int64_t block = std::max<int64_t>(warmup_panels, kScanBlockBytes / (codes.d4 * kQuantGroupBytes));
    // A call of one group (streaming: a frame or a few tokens) reads each code once, from memory: its
    // scans prefetch ahead. With more groups, all but the first find each block in L2 already.
    const int64_t prefetch_end = n <= kScanGroupRows ? q_end : 0;
    for (int64_t q0 = q_begin; q0 < q_end; q0 += block) {
      const int64_t q1 = std::min(q_end, q0 + block);
      const int64_t warmup = q0 == q_begin && !hint && !carried ? std::min(warmup_panels, q1 - q0) : 0;
      for (int64_t g = g0; g < g1; ++g) {
        ScanSlot& s = slot(g);
        const int64_t r0 = g * kScanGroupRows, rows = group_rows(g);
        if (layout.amx) {
#ifdef FASTVQ_HAVE_AMX_KERNEL
          prefilter_scan_amx(static_cast<int>(rows), block_rows.levels(layout, r0), layout.row_words,
                             block_rows.terms(r0), codes, q0, q1, warmup, s.running, s.cand.get(), s.cand_val.get(),
                             kCandidateCap, s.count, prefetch_end);
#endif
          continue;
        }
        for (int64_t r = 0; r < rows; r += kernels.scan_rows)
          kernels.scan(static_cast<int>(std::min<int64_t>(kernels.scan_rows, rows - r)),
                       block_rows.levels(layout, r0 + r), block_rows.terms(r0 + r), codes, q0, q1, warmup,
                       s.running + r * 16, s.cand.get() + r * kCandidateCap, s.cand_val.get() + r * kCandidateCap,
                       kCandidateCap, s.count + r, r == 0 ? prefetch_end : 0);
      }
    }
  }

  // Each row of group g starts its running minimum at its hinted code's S~, the scans' value: the
  // minimum stays one of the codes' S~, so whatever the hint, the codes listed are a superset of those
  // the bound lets through, and a good hint (the row's code in the last k-means iteration) replaces the
  // warm-up and lists fewer codes.
  void start_from_hints(const QuantizedBlock& block_rows, int64_t g, ScanSlot& s) const {
    const int64_t r0 = g * kScanGroupRows;
    for (int64_t r = 0; r < group_rows(g); ++r) {
      const float start = approximate_score(codes, block_rows.levels(layout, r0 + r), layout.stride(),
                                            *block_rows.terms(r0 + r), hint[r0 + r]);
      std::fill(s.running + r * 16, s.running + (r + 1) * 16, start);
    }
  }

  // Finish group g: each row keeps its listed codes (chunks in code order) whose lower bound L = S~ - R is
  // within the smallest upper bound U = S~ + R among them (in double: rounding errors far inside the
  // 4 u M that prefilter_codes.cpp adds to rho for float32 arithmetic). The float32 search's choice is one
  // of them: a row that keeps one code takes it; the others' codes are scored with the search kernels'
  // float32 arithmetic, all rows' in one batch so that several FMA chains are in flight. Then the outputs.
  // (quantize_row_levels has checked the ranges.)
  void finish_group(const QuantizedBlock& block_rows, int64_t g, const ScanSlot* const* slots, int64_t nchunks,
                    GroupScratch& scratch, CallStats& stats, const NearestCodeOutputs& out) const {
    const int64_t d = pack.d, r0 = g * kScanGroupRows, rows = group_rows(g);
    size_t room = 0;  // at most the codes the chunks listed (a chunk lists at most kCandidateCap of a row)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < nchunks; ++c) room += static_cast<size_t>(std::min(slots[c]->count[r], kCandidateCap));
    if (scratch.rows.size() < room) {
      scratch.rows.resize(room);
      scratch.codes.resize(room);
    }
    int64_t kept = 0;  // written unconditionally, kept by advancing: the test below is data-dependent
    for (int64_t r = 0; r < rows; ++r) {
      float* centred = scratch.centred.data() + r * d;
      const auto centre_row = [&] {
        for (int64_t p = 0; p < d; ++p) centred[p] = x[(r0 + r) * d + p] - pack.centre[p];  // pack_rows' values
      };
      scratch.best_val[static_cast<size_t>(r)] = std::numeric_limits<float>::infinity();
      scratch.best_idx[static_cast<size_t>(r)] = -1;
      bool overflow = false;
      for (int64_t c = 0; c < nchunks; ++c) overflow |= slots[c]->count[r] > kCandidateCap;
      if (overflow) {  // the float32 kernel over every panel (it reads the row as a packed tile)
        ++stats.rows_in_full;
        centre_row();
        for (int64_t p = 0; p < d; ++p) scratch.tile.ptr[p * kTileRows] = centred[p];
        few_rows(1, scratch.tile.ptr, d, pack.panels, pack.norms, pack.npanels, 0,
                 &scratch.best_val[static_cast<size_t>(r)], &scratch.best_idx[static_cast<size_t>(r)]);
        continue;
      }
      const QuantizedRow& qrow = *block_rows.terms(r0 + r);
      const double alpha = qrow.alpha, beta = qrow.beta, rho = qrow.rho;
      const auto radius = [&](int32_t code) {
        return alpha * codes.error_norm[code] + beta * codes.quant_norm[code] + rho;
      };
      double threshold = std::numeric_limits<double>::infinity();  // the listed codes' smallest U
      for (int64_t c = 0; c < nchunks; ++c)
        for (int64_t t = 0; t < slots[c]->count[r]; ++t) {
          const size_t at = static_cast<size_t>(r * kCandidateCap + t);
          threshold = std::min(threshold, slots[c]->cand_val[at] + radius(slots[c]->cand[at]));
        }
      const int64_t row_start = kept;
      for (int64_t c = 0; c < nchunks; ++c) {
        stats.candidates += slots[c]->count[r];
        for (int64_t t = 0; t < slots[c]->count[r]; ++t) {
          const size_t at = static_cast<size_t>(r * kCandidateCap + t);
          const int32_t code = slots[c]->cand[at];
          scratch.rows[static_cast<size_t>(kept)] = static_cast<int32_t>(r);
          scratch.codes[static_cast<size_t>(kept)] = code;
          kept += slots[c]->cand_val[at] - radius(code) <= threshold;
        }
      }
      stats.codes_kept += kept - row_start;
      if (kept - row_start == 1) {  // the float32 search's choice is the one code kept: no score needed
        scratch.best_idx[static_cast<size_t>(r)] = scratch.codes[static_cast<size_t>(row_start)];
        kept = row_start;
      } else {
        centre_row();
      }
    }
    kernels.rescore(scratch.centred.data(), d, codebook, pack.centre, pack.norms, scratch.rows.data(),
                    scratch.codes.data(), kept, scratch.best_val.data(), scratch.best_idx.data());
    finish_rows(x, d, codebook, r0, r0 + rows, scratch.best_idx.data(), out);
  }
};

}  // namespace

void set_prefilter_mode(const std::string& mode) {
  Mode m;
  if (mode == "auto") m = Mode::automatic;
  else if (mode == "always") m = Mode::always;
  else if (mode == "off") m = Mode::off;
  else throw std::invalid_argument("mode must be one of 'auto', 'always', 'off', got '" + mode.substr(0, 40) + "'");
  mode_state().store(static_cast<int>(m));
}

std::string prefilter_mode() {
  switch (static_cast<Mode>(mode_state().load())) {
    case Mode::always: return "always";
    case Mode::off: return "off";
    default: return "auto";
  }
}

namespace {
// The AMX scan when the kernel choice allows it and the machine has it (for the VNNI set's rows).
bool use_amx() {
  const Kernel kernel = static_cast<Kernel>(kernel_state().load());
  return kernel != Kernel::vnni && kernel != Kernel::avx2 && amx_ready() && is_vnni(scan_kernels());
}

// The scan for a call of n rows: "auto" takes the VNNI scan below kAmxMinRows rows (an AMX tile
// multiplies 16 rows whatever the count; the VNNI scan does work for the rows it has).
bool use_amx_for(int64_t n) {
  return use_amx() && (n >= kAmxMinRows || static_cast<Kernel>(kernel_state().load()) == Kernel::amx);
}
}  // namespace

void set_prefilter_kernel(const std::string& kernel) {
  Kernel k;
  if (kernel == "auto") k = Kernel::automatic;
  else if (kernel == "vnni") k = Kernel::vnni;
  else if (kernel == "amx") k = Kernel::amx;
  else if (kernel == "avx2") k = Kernel::avx2;
  else
    throw std::invalid_argument("kernel must be one of 'auto', 'vnni', 'amx', 'avx2', got '" + kernel.substr(0, 40) +
                                "'");
  if (k == Kernel::amx && !amx_ready())
    throw std::invalid_argument("kernel 'amx' is not available here (the CPU or build lacks AMX-INT8, or the OS "
                                "refused the tile state)");
  if (k == Kernel::vnni && !cpu_has_vnni())
    throw std::invalid_argument("kernel 'vnni' is not available here (the CPU or build lacks AVX-512 VNNI)");
#ifndef FASTVQ_HAVE_AVX2_KERNEL
  if (k == Kernel::avx2) throw std::invalid_argument("kernel 'avx2' is not available here (this build has no AVX2)");
#endif
  if (k == Kernel::avx2 && !cpu_has_avx2())
    throw std::invalid_argument("kernel 'avx2' is not available here (the CPU lacks AVX2 and FMA)");
  kernel_state().store(static_cast<int>(k));
}

std::string prefilter_kernel() {
  const PrefilterKernels* kernels = scan_kernels();
  if (!kernels) return "";
  return is_vnni(kernels) && use_amx() ? "amx" : kernels->name;
}

PrefilterStats prefilter_stats() {
  return {calls_prefiltered.load(), rows_in_full.load(), calls_declined.load(), codes_kept.load(),
          candidates.load(), calls_deferred.load(), calls_amx.load(), calls_kept_rows.load()};
}

std::string prefilter_reason(int64_t n, int64_t k, int64_t d) {
  const Mode mode = static_cast<Mode>(mode_state().load());
  if (mode == Mode::off) return "the prefilter is off (set_prefilter('off'))";
  if (!scan_kernels()) {
    if (current_simd_level() == SimdLevel::portable) return "the SIMD level is 'portable': no int8 scan";
    return "this CPU or build has no AVX-512 VNNI (vpdpbusd), and at SIMD level 'avx512' the AVX2 int8 scan runs "
           "only when asked for (set_prefilter_kernel('avx2'))";
  }
  if (d > kPrefilterMaxDim) return "d = " + std::to_string(d) + " > " + std::to_string(kPrefilterMaxDim);
  if (n == 0) return "no rows";
  if (mode == Mode::always) return "";
  const AutoThresholds& at = auto_thresholds(scan_kernels());
  if (d < at.min_dim)
    return "d = " + std::to_string(d) + " < " + std::to_string(at.min_dim) + ": float32 products are cheaper";
  const bool enough = k >= at.min_codes && k * d >= at.min_code_floats;
  const bool enough_for_amx =
      d >= kAmxMinDim && k >= kAmxMinCodes && k * d >= (d >= kAmxWideDim ? kAmxMinCodeFloatsWide : kAmxMinCodeFloats);
  if (!enough && !(use_amx() && enough_for_amx)) {
    std::string amx;
    if (use_amx())
      amx = "; with the AMX scan, K >= " + std::to_string(kAmxMinCodes) + " and K d >= " +
            std::to_string(kAmxMinCodeFloats) + " from d = " + std::to_string(kAmxMinDim) + ", " +
            std::to_string(kAmxMinCodeFloatsWide) + " from d = " + std::to_string(kAmxWideDim);
    return "K = " + std::to_string(k) + ", K d = " + std::to_string(k * d) +
           ": too few codes to pay back (auto needs K >= " + std::to_string(at.min_codes) + " and K d >= " +
           std::to_string(at.min_code_floats) + amx + ")";
  }
  const int64_t for_rows =
      n < kFewRows ? at.few_rows_min_code_floats : n < kSomeRows ? at.some_rows_min_code_floats : 0;
  if (k * d < for_rows)
    return "n = " + std::to_string(n) + " rows, K d = " + std::to_string(k * d) + ": too few codes for so few rows " +
           "(auto needs K d >= " + std::to_string(at.few_rows_min_code_floats) + " below " +
           std::to_string(kFewRows) + " rows, " + std::to_string(at.some_rows_min_code_floats) + " below " +
           std::to_string(kSomeRows) + ")";
  return "";
}

bool nearest_code_prefiltered(const float* x, int64_t n, const float* codebook, const PackedCodebook& pack,
                              const NearestCodeOutputs& out, int nt, const int64_t* hint, CacheKey rows_key) {
  const PrefilterKernels* kernels = scan_kernels();
  const SearchFewRowsFn few_rows = current_search_few_rows();
  if (!kernels || !few_rows || n == 0) return false;
  if (static_cast<Mode>(mode_state().load()) == Mode::automatic && n < kPrefilterMinRowsToBuild &&
      pack.cache_hits.load() == 0 && !has_quantized_codes(pack)) {
    calls_deferred.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  const std::shared_ptr<const QuantizedCodes> codes_ptr = quantized_codes(pack, *kernels, nt);
  const QuantizedCodes& codes = *codes_ptr;
  const int64_t ngroups = (n + kScanGroupRows - 1) / kScanGroupRows, npanels = pack.npanels;
  const RowLayout layout{kernels, is_vnni(kernels) && use_amx_for(n), codes.d4, (codes.d4 + 15) / 16 * 16};
  const Prefiltered run{x, codebook, pack, codes, layout, n, few_rows, *kernels, hint};
  const int64_t want_items = 4 * static_cast<int64_t>(nt);
  const int64_t nchunks = (nt <= 1 || ngroups >= want_items)
                              ? 1
                              : std::max<int64_t>(1, std::min((want_items + ngroups - 1) / ngroups,
                                                              npanels / kMinChunkPanels));
  CallStats stats;
  bool declined = false;
  // A hinted call searches these rows again (k-means): their quantization is kept for the next one.
  std::shared_ptr<const KeptRows> kept;  // from an earlier call
  std::shared_ptr<KeptRows> keeping;     // quantized by this call's items, kept if it answers
  if (nchunks == 1 && hint && rows_key.size > 0 && n >= kKeepRowsMinRows) {
    kept = find_kept_rows(rows_key, pack.centre, n, pack.d, layout);
    if (!kept) keeping = new_kept_rows(rows_key, n, pack.d, pack.centre, layout);
  }
  if (nchunks == 1) {  // items of kGroupsPerItem groups: quantize their rows, scan every panel, finish them
    const int64_t nitems = (ngroups + kGroupsPerItem - 1) / kGroupsPerItem;
    std::atomic<bool> any_declined{false};
#pragma omp parallel num_threads(nt)
    {
      std::vector<ScanSlot> slots;
      slots.reserve(static_cast<size_t>(kGroupsPerItem));
      for (int64_t g = 0; g < kGroupsPerItem; ++g) slots.emplace_back(kScanGroupRows);
      GroupScratch scratch(pack.d);
      QuantizedBlock block_rows;
      CallStats mine;
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < nitems; ++item) {
        if (any_declined.load(std::memory_order_relaxed)) continue;
        const int64_t g0 = item * kGroupsPerItem, g1 = std::min(ngroups, g0 + kGroupsPerItem);
        const int64_t r0 = g0 * kScanGroupRows, r1 = std::min(n, g1 * kScanGroupRows);
        // A declined row stops the call; the rows answered so far are overwritten by the full search.
        if (!(kept ? block_rows.reuse(*kept, r0, r1 - r0, codes)
                   : block_rows.quantize(x, r0, r1 - r0, pack.centre, codes, layout, 1, keeping.get()))) {
          any_declined.store(true, std::memory_order_relaxed);
          continue;
        }
        run.scan_groups(block_rows, g0, g1, 0, npanels,
                        [&](int64_t g) -> ScanSlot& { return slots[static_cast<size_t>(g - g0)]; });
        for (int64_t g = g0; g < g1; ++g) {
          const ScanSlot* slot = &slots[static_cast<size_t>(g - g0)];
          run.finish_group(block_rows, g, &slot, 1, scratch, mine, out);
        }
      }
#pragma omp critical(fastvq_prefilter_stats)
      stats.add(mine);
    }
    declined = any_declined.load();
  } else {  // few rows: quantize them all; one item per code chunk, every group in it; then the rows
    QuantizedBlock block_rows;
    declined = !block_rows.quantize(x, 0, n, pack.centre, codes, layout, nt);
    if (!declined) {
      std::vector<ScanSlot> slots;  // [chunk][group]
      slots.reserve(static_cast<size_t>(ngroups * nchunks));
      for (int64_t c = 0; c < nchunks; ++c)
        for (int64_t g = 0; g < ngroups; ++g) slots.emplace_back(run.group_rows(g));
      const auto slot_of = [&](int64_t g, int64_t c) -> ScanSlot& {
        return slots[static_cast<size_t>(c * ngroups + g)];
      };
      // A thread carries its rows' smallest S~ from one chunk to its next: each chunk after its first starts
      // from a near-final minimum instead of a warm-up, and lists fewer codes. K = 65536, d = 64, same
      // process: 16 rows list 100 -> 38 codes a row, 32 rows 108 -> 38, 1 row 159 -> 71; 16 rows cold
      // (after a faiss and a torch.cdist call) 402 -> 390, 512 -> 459, 446 -> 427 us; 32 rows 688 -> 616.
#pragma omp parallel num_threads(nt)
      {
        std::vector<float> carried;  // [row]: empty until this thread's first chunk is done
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < nchunks; ++c) {
          run.scan_groups(block_rows, 0, ngroups, npanels * c / nchunks, npanels * (c + 1) / nchunks,
                          [&](int64_t g) -> ScanSlot& { return slot_of(g, c); },
                          carried.empty() ? nullptr : carried.data());
          carried.assign(static_cast<size_t>(n), std::numeric_limits<float>::infinity());
          for (int64_t g = 0; g < ngroups; ++g)
            for (int64_t r = 0; r < run.group_rows(g); ++r) {
              const float* lanes = slot_of(g, c).running + r * 16;
              carried[static_cast<size_t>(g * kScanGroupRows + r)] = *std::min_element(lanes, lanes + 16);
            }
        }
      }
      GroupScratch scratch(pack.d);
      std::vector<const ScanSlot*> group_slots(static_cast<size_t>(nchunks));
      for (int64_t g = 0; g < ngroups; ++g) {
        for (int64_t c = 0; c < nchunks; ++c) group_slots[static_cast<size_t>(c)] = &slot_of(g, c);
        run.finish_group(block_rows, g, group_slots.data(), nchunks, scratch, stats, out);
      }
    }
  }
  if (declined) {
    calls_declined.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  calls_prefiltered.fetch_add(1, std::memory_order_relaxed);
  if (layout.amx) calls_amx.fetch_add(1, std::memory_order_relaxed);
  if (kept) calls_kept_rows.fetch_add(1, std::memory_order_relaxed);
  if (keeping) keep_rows(std::move(keeping));
  rows_in_full.fetch_add(stats.rows_in_full, std::memory_order_relaxed);
  codes_kept.fetch_add(stats.codes_kept, std::memory_order_relaxed);
  candidates.fetch_add(stats.candidates, std::memory_order_relaxed);
  return true;
}

}  // namespace fastvq::cpu
