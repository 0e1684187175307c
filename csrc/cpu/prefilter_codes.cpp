// The int8 prefilter's host side (prefilter_codes.h): quantizing codes and rows, and the bound.
//
// The bound (u = 2^-24, e'' = the pack's panel values -2(e - c), x' = x - c in float32, e^ = s_e q and
// x^ = s_x r the quantized vectors, n = the pack's ||e - c||^2):
//   the kernels' score S = n + sum_p x'_p e''_p with one FMA per p from n: d roundings, so
//       |S - (n + x'.e'')| <= gamma_d (n + ||x'|| ||e''||),   gamma_d = d u / (1 - d u);
//   x'.e'' - x^.e^ = x'.(e'' - e^) + (x' - x^).e^, so
//       |x'.e'' - x^.e^| <= ||x'|| ||e'' - e^|| + ||x' - x^|| ||e^||;
//   the scan's S~ = fl(n + T fl(s_x s_e)) with T = r.q (an exact integer, exactly converted for
//   d <= 1024): the scale product errs by u relative, the FMA rounds once, so
//       |S~ - (n + x^.e^)| <= u (n + ||x^|| ||e^||) + u ||x^|| ||e^|| (to first order in u).
// So |S - S~| <= R(e) = alpha a_e + beta b_e + rho0 with alpha = ||x'||, beta = ||x' - x^||, the code's
// a_e = ||e'' - e^|| and b_e = ||e^||, and rho0 = gamma_d (N + ||x'|| E) + u (N + 2 ||x^|| H) over the
// codes' maxima N, E, H of n, ||e''||, ||e^||. The full search's choice e* (and any code tied with it)
// then has L(e*) = S~(e*) - R(e*) <= S(e*) <= S(e) <= S~(e) + R(e) = U(e) for every e. The scan computes
// R, U and L in float32 (two FMAs, an add, a subtract): each rounding errs by at most u M, with M a
// bound on |S~| + R; rho = rho0 + 4 u M makes the computed L(e*) stay below every computed U(e).
// The scan tests only S~ against the row's running minimum of S~ plus a spread: with m = argmin S~,
// L(e*) <= U(m) gives S~(e*) <= S~(m) + R^(e*) + R^(m) + 2 u M (each of the two computed values errs by
// at most u M), and every computed radius R^ (two FMAs over the rounded-up code terms) is at most
// (alpha E + beta H' + rho)(1 + 2^-18) with E, H' the codes' maxima of a_e, b_e. So
// spread = 2 (alpha E + beta H' + rho)(1 + 2^-18) + 4 u M, rounded up, lists e* (and its ties).
#include "cpu/prefilter_codes.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <stdexcept>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/large_buffer.h"
#include "cpu/search_common.h"

namespace fastvq::cpu {
namespace {

// Products of scales outside these (not normal float32 numbers, or near overflow) decline the row.
const double kMinScaleProduct = std::ldexp(1.0, -126);
const double kMaxScaleProduct = std::ldexp(1.0, 100);

// The scale of a vector whose largest magnitude is max_abs: its levels fill [-max_level, max_level] (1 for
// zeros).
float quant_scale(double max_abs, int32_t max_level) {
  const float s = static_cast<float>(max_abs / max_level);
  return s > 0.0f ? s : 1.0f;
}

// The smallest float32 >= v (v >= 0, with 2^-20 relative on top for the double arithmetic before).
// Called a few times per row: the next float up by its bits, not nextafter (a libm call).
float round_up(double v) {
  v *= 1.0 + kRoundUpSlack;
  float f = static_cast<float>(v);
  if (static_cast<double>(f) < v) {  // f >= 0 and finite here: its successor is the next bit pattern
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    ++bits;
    std::memcpy(&f, &bits, sizeof f);
  }
  return f;
}

struct Maxima {
  double panel_norm = 0, error_norm = 0, quant_norm = 0, norm = 0;
  double min_scale = std::numeric_limits<double>::infinity(), max_scale = 0;
  bool any = false;
  void add(const Maxima& o) {
    panel_norm = std::max(panel_norm, o.panel_norm);
    error_norm = std::max(error_norm, o.error_norm);
    quant_norm = std::max(quant_norm, o.quant_norm);
    norm = std::max(norm, o.norm);
    min_scale = std::min(min_scale, o.min_scale);
    max_scale = std::max(max_scale, o.max_scale);
    any |= o.any;
  }
};

// Quantize panel q into `codes`, returning its contribution to the maxima. A code that can never win
// (padding past K, non-finite entries) gets level 0, scale 1 and a NaN norm.
Maxima quantize_panel(const PackedCodebook& pack, const PrefilterKernels& kernels, QuantizedCodes& codes,
                      int64_t q) {
  uint8_t* bytes = codes.bytes + q * codes.d4 * kQuantGroupBytes;
  double norms[3 * kPanel];
  kernels.quantize_panel(pack.panels + q * pack.d * kPanel, pack.d, codes.d4, bytes, codes.scale + q * kPanel, norms);
  Maxima m;
  for (int j = 0; j < kPanel; ++j) {
    const int64_t code = q * kPanel + j;
    const float norm = pack.norms[code];
    if (code >= pack.k || !std::isfinite(norm)) {  // never wins: NaN passes no comparison
      for (int64_t g = 0; g < codes.d4; ++g) {
        uint8_t* group = bytes + g * kQuantGroupBytes + j * 4;
        std::fill(group, group + 4, uint8_t{128});
      }
      codes.scale[code] = 1.0f;
      codes.norm[code] = std::numeric_limits<float>::quiet_NaN();
      codes.error_norm[code] = codes.quant_norm[code] = 0.0f;
      continue;
    }
    codes.norm[code] = norm;
    codes.error_norm[code] = round_up(std::sqrt(norms[kPanel + j]));
    codes.quant_norm[code] = round_up(std::sqrt(norms[2 * kPanel + j]));
    m.panel_norm = std::max(m.panel_norm, std::sqrt(norms[j]));
    m.error_norm = std::max(m.error_norm, std::sqrt(norms[kPanel + j]));
    m.quant_norm = std::max(m.quant_norm, std::sqrt(norms[2 * kPanel + j]));
    m.norm = std::max(m.norm, static_cast<double>(norm));
    m.min_scale = std::min(m.min_scale, static_cast<double>(codes.scale[code]));
    m.max_scale = std::max(m.max_scale, static_cast<double>(codes.scale[code]));
    m.any = true;
  }
  return m;
}

std::shared_ptr<const QuantizedCodes> build(const PackedCodebook& pack, const PrefilterKernels& kernels, int nt) {
  auto codes = std::make_shared<QuantizedCodes>();
  codes->npanels = pack.npanels;
  codes->d = pack.d;
  codes->d4 = (pack.d + 3) / 4;
  const size_t byte_count =
      round_up64(static_cast<size_t>(pack.npanels * codes->d4 * kQuantGroupBytes + kAmxChunkBytes));
  const size_t float_bytes = round_up64(static_cast<size_t>(pack.npanels * kPanel) * sizeof(float));
  codes->nbytes = large_buffer_bytes(byte_count + 4 * float_bytes);
  char* base = static_cast<char*>(allocate_large(codes->nbytes));
  codes->bytes = reinterpret_cast<uint8_t*>(base);
  codes->scale = reinterpret_cast<float*>(base + byte_count);
  codes->norm = reinterpret_cast<float*>(base + byte_count + float_bytes);
  codes->error_norm = reinterpret_cast<float*>(base + byte_count + 2 * float_bytes);
  codes->quant_norm = reinterpret_cast<float*>(base + byte_count + 3 * float_bytes);
  std::fill(codes->bytes + pack.npanels * codes->d4 * kQuantGroupBytes, codes->bytes + byte_count, uint8_t{0});
  std::vector<Maxima> per_panel(static_cast<size_t>(pack.npanels));
#pragma omp parallel for schedule(static) num_threads(nt) if (pack.npanels * pack.d >= (int64_t{1} << 16))
  for (int64_t q = 0; q < pack.npanels; ++q)
    per_panel[static_cast<size_t>(q)] = quantize_panel(pack, kernels, *codes, q);
  Maxima all;
  for (const Maxima& m : per_panel) all.add(m);
  codes->max_panel_norm = all.panel_norm;
  codes->max_error_norm = all.error_norm;
  codes->max_quant_norm = all.quant_norm;
  codes->max_norm = all.norm;
  codes->min_scale = all.any ? all.min_scale : 1.0;
  codes->max_scale = all.any ? all.max_scale : 1.0;
  codes->any_code = all.any;
  return codes;
}

}  // namespace

QuantizedCodes::~QuantizedCodes() { std::free(bytes); }

std::shared_ptr<const QuantizedCodes> quantized_codes(const PackedCodebook& pack, const PrefilterKernels& kernels,
                                                      int num_threads) {
  std::shared_ptr<const QuantizedCodes> codes;
  {
    std::lock_guard<std::mutex> lock(pack.quantized_mutex);
    if (!pack.quantized) {
      pack.quantized = build(pack, kernels, resolve_threads(num_threads));
      pack.quantized_bytes.store(pack.quantized->nbytes);
    }
    codes = pack.quantized;
  }
  trim_pack_cache();  // the copy's bytes count towards the cache's bound
  return codes;
}

bool has_quantized_codes(const PackedCodebook& pack) {
  std::lock_guard<std::mutex> lock(pack.quantized_mutex);
  return pack.quantized != nullptr;
}

bool quantize_row_levels(const PrefilterKernels& kernels, const float* row, const float* centre, int64_t d,
                         int64_t d4, int32_t* xq, int64_t stride, RowLevels& out) {
  // pack_rows' range check, bitwise: the prefilter declines exactly the rows the full search refuses,
  // and every non-finite row (an inf or NaN entry makes the sum inf or NaN). Rows far inside the range
  // (d max^2, with room for the sum's roundings) skip the exact sum; a NaN that the maximum passes over
  // makes the norms NaN, and the row is declined by the bound's finiteness (bound_rows).
  const float max_abs = kernels.max_abs(row, centre, d);
  if (!(static_cast<double>(max_abs) * max_abs * static_cast<double>(d) <= kMaxCentredSquaredNorm / 2) &&
      !(squared_l2(row, centre, d) <= static_cast<float>(kMaxCentredSquaredNorm)))
    return false;
  out.scale = quant_scale(max_abs, kernels.max_level);
  double sums[3];
  out.sum = kernels.levels(row, centre, d, d4, out.scale, xq, stride, sums);
  out.norm_sq = sums[0];
  out.error_sq = sums[1];
  out.quant_sq = sums[2];
  return true;
}

bool bound_rows(const RowLevels* rows, int64_t count, const QuantizedCodes& codes, QuantizedRow* qrows) {
#ifdef FASTVQ_HAVE_AVX2_KERNEL
  double norm_sq[kRowBatch], error_sq[kRowBatch], quant_sq[kRowBatch];
  for (int64_t i = 0; i < count; ++i) {
    const float s = rows[i].scale;
    if (codes.any_code && !(s * codes.min_scale >= kMinScaleProduct && s * codes.max_scale <= kMaxScaleProduct))
      return false;
    norm_sq[i] = rows[i].norm_sq;
    error_sq[i] = rows[i].error_sq;
    quant_sq[i] = rows[i].quant_sq;
    qrows[i].scale = s;
    qrows[i].correction = 128 * rows[i].sum;
  }
  // alpha = ||x'||, beta = ||x' - x^||, rho = rho0 + 4 u M and the spread, as derived above, 4 rows at once.
  const unsigned all = (1u << count) - 1u;
  return prefilter_row_bounds_avx2(norm_sq, error_sq, quant_sq, static_cast<int>(count), codes, qrows) == all;
#else
  (void)rows, (void)count, (void)codes, (void)qrows;
  return false;  // no scan to feed (every kernel set needs the AVX2 kernels)
#endif
}

float approximate_score(const QuantizedCodes& codes, const int32_t* levels, int64_t stride, const QuantizedRow& qrow,
                        int64_t code) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  if (code < 0 || code >= codes.npanels * kPanel || std::isnan(codes.norm[code])) return kInf;
  const uint8_t* bytes = codes.bytes + (code / kPanel) * codes.d4 * kQuantGroupBytes + (code % kPanel) * 4;
  // The codes' bytes are q + 128: the scans' accumulators start at -correction and end at r . q.
  int32_t dot = -qrow.correction;
  for (int64_t g = 0; g < codes.d4; ++g)
    for (int b = 0; b < 4; ++b)
      dot += static_cast<int32_t>(bytes[g * kQuantGroupBytes + b]) *
             static_cast<int8_t>(static_cast<uint32_t>(levels[g * stride]) >> (8 * b));
  // The scans' arithmetic: the scale product rounded to float32, then one FMA (approximate_scores).
  const float product = codes.scale[code] * qrow.scale;
  return std::fma(static_cast<float>(dot), product, codes.norm[code]);
}

}  // namespace fastvq::cpu
