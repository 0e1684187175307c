// fastvq._cpu: nanobind bindings of the CPU kernels.
//
// Arrays arrive through DLPack (CPU torch tensors and numpy arrays both work): float32 or
// int64, C-contiguous, on the CPU. Outputs are preallocated by the caller and written in
// place. Every argument is checked here (csrc/common/checks.h) before the GIL is released;
// a mismatch raises ValueError naming the argument, the expected and the actual shape.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/nb_args.h"
#include "cpu/fma_peak.h"
#include "cpu/int8_speed.h"
#include "cpu/kernels.h"
#include "cpu/nearest_code_prefilter.h"
#include "cpu/pack_codebook.h"
#include "cpu/prefilter_rows.h"

namespace nb = nanobind;
using namespace nb::literals;
using fastvq::checks::ArrayArg;
using fastvq::checks::as_or_null;
using fastvq::checks::check_array;
using fastvq::checks::check_shape;
using fastvq::checks::check_shape_k_d;
using fastvq::checks::check_shape_n;
using fastvq::checks::check_shape_n_d;
using fastvq::checks::eq;
using fastvq::checks::kAnySize;
using fastvq::nbargs::describe;
using fastvq::nbargs::In;
using fastvq::nbargs::Out;

namespace {

std::pair<int64_t, int64_t> check_x(const ArrayArg& x) {
  check_array(x, "float32");
  return fastvq::checks::check_x_shape(x);
}

int64_t check_codebook(const ArrayArg& codebook, int64_t d) {
  check_array(codebook, "float32");
  // Lane indices inside the micro-kernels are int32.
  return fastvq::checks::check_codebook_shape(codebook, d, std::numeric_limits<int32_t>::max() - 64, "K < 2**31 - 64");
}

void check_rows(const ArrayArg& a, const char* dtype, int64_t n) {
  check_array(a, dtype);
  check_shape_n(a, n);
}

void check_rows_by_d(const ArrayArg& a, int64_t n, int64_t d) {
  check_array(a, "float32");
  check_shape_n_d(a, n, d);
}

void nearest_code(In x_, In codebook_, Out indices_out_, Out sqdist_out_,
                  std::optional<Out> quantized_out_, int num_threads, const std::vector<int64_t>& cache_key,
                  std::optional<In> hint_, const std::vector<int64_t>& rows_key) {
  const ArrayArg x = describe("x", x_);
  const auto [n, d] = check_x(x);
  const ArrayArg codebook = describe("codebook", codebook_);
  const int64_t k = check_codebook(codebook, d);
  const ArrayArg indices_out = describe("indices_out", indices_out_);
  check_rows(indices_out, "int64", n);
  const ArrayArg sqdist_out = describe("sqdist_out", sqdist_out_);
  check_rows(sqdist_out, "float32", n);
  const std::optional<ArrayArg> quantized_out = describe("quantized_out", quantized_out_);
  if (quantized_out) check_rows_by_d(*quantized_out, n, d);
  const std::optional<ArrayArg> hint = describe("hint", hint_);
  if (hint) check_rows(*hint, "int64", n);

  nb::gil_scoped_release release;
  fastvq::cpu::nearest_code(x.as<const float>(), n, d, codebook.as<const float>(), k,
                            {cache_key.data(), static_cast<int64_t>(cache_key.size())}, indices_out.as<int64_t>(),
                            sqdist_out.as<float>(), as_or_null<float>(quantized_out), num_threads,
                            as_or_null<const int64_t>(hint), {rows_key.data(), static_cast<int64_t>(rows_key.size())});
}

void sample_code(In x_, In codebook_, Out indices_out_, double temperature, int64_t seed, bool cosine,
                 int num_threads) {
  const ArrayArg x = describe("x", x_);
  const auto [n, d] = check_x(x);
  const ArrayArg codebook = describe("codebook", codebook_);
  const int64_t k = check_codebook(codebook, d);
  const ArrayArg indices_out = describe("indices_out", indices_out_);
  check_rows(indices_out, "int64", n);
  if (!(temperature > 0.0) || !std::isfinite(temperature)) {
    throw nb::value_error(("temperature must be a finite number > 0, got " + std::to_string(temperature)).c_str());
  }
  nb::gil_scoped_release release;
  fastvq::cpu::sample_code(x.as<const float>(), n, d, codebook.as<const float>(), k, temperature, seed, cosine,
                           indices_out.as<int64_t>(), num_threads);
}

void nearest_codes(In x_, In codebook_, Out indices_out_, Out sqdist_out_, int num_threads,
                   const std::vector<int64_t>& cache_key) {
  const ArrayArg x = describe("x", x_);
  const auto [n, d] = check_x(x);
  const ArrayArg codebook = describe("codebook", codebook_);
  const int64_t k = check_codebook(codebook, d);
  const ArrayArg indices_out = describe("indices_out", indices_out_);
  check_array(indices_out, "int64");
  check_shape(indices_out, {n, kAnySize}, "(N, topk)", eq("N == x.shape[0]", n));
  const int64_t topk = indices_out.size(1);
  constexpr int64_t kMaxTopk = 64;
  if (topk < 1 || topk > std::min(k, kMaxTopk))
    fastvq::checks::fail("indices_out must have shape (N, topk) with 1 <= topk <= min(K, 64) = " +
                         std::to_string(std::min(k, kMaxTopk)) + ", got topk = " + std::to_string(topk));
  const ArrayArg sqdist_out = describe("sqdist_out", sqdist_out_);
  check_array(sqdist_out, "float32");
  check_shape(sqdist_out, {n, topk}, "(N, topk)", eq("N == x.shape[0]", n) + " and " + eq("topk == indices_out.shape[1]", topk));

  nb::gil_scoped_release release;
  fastvq::cpu::nearest_codes(x.as<const float>(), n, d, codebook.as<const float>(), k, static_cast<int>(topk),
                             {cache_key.data(), static_cast<int64_t>(cache_key.size())}, indices_out.as<int64_t>(),
                             sqdist_out.as<float>(), num_threads);
}

void search_centre(In codebook_, Out centre_out_, int num_threads) {
  const ArrayArg codebook = describe("codebook", codebook_);
  check_array(codebook, "float32");
  check_shape(codebook, {kAnySize, kAnySize}, "(K, d)");
  const int64_t k = codebook.size(0), d = codebook.size(1);
  const ArrayArg centre_out = describe("centre_out", centre_out_);
  check_array(centre_out, "float32");
  check_shape(centre_out, {d}, "(d,) with d == codebook.shape[1]");
  nb::gil_scoped_release release;
  fastvq::cpu::search_centre(codebook.as<const float>(), k, d, centre_out.as<float>(), num_threads);
}

int64_t kmeanspp_accept(In gram_, In norms_, In pool_rows_, In uniform_, In old_, int64_t block, Out kept_out_) {
  const ArrayArg norms = describe("norms", norms_);
  check_array(norms, "float64");
  check_shape(norms, {kAnySize}, "(P,)");
  const int64_t count = norms.size(0);
  const std::string same = eq("P == norms.shape[0]", count);
  const ArrayArg gram = describe("gram", gram_);
  check_array(gram, "float64");
  check_shape(gram, {count, count}, "(P, P)", same);
  const auto per_proposal = [&](const char* name, const auto& array, const char* dtype) {  // (P,) of dtype
    const ArrayArg a = describe(name, array);
    check_array(a, dtype);
    check_shape(a, {count}, "(P,)", same);
    return a;
  };
  const ArrayArg pool_rows = per_proposal("pool_rows", pool_rows_, "int64");
  const ArrayArg uniform = per_proposal("uniform", uniform_, "float64");
  const ArrayArg old = per_proposal("old", old_, "float64");
  const ArrayArg kept_out = per_proposal("kept_out", kept_out_, "int64");
  if (block < 0) throw nb::value_error(("block must be >= 0, got " + std::to_string(block)).c_str());
  nb::gil_scoped_release release;
  return fastvq::cpu::kmeanspp_accept(gram.as<const double>(), norms.as<const double>(), pool_rows.as<const int64_t>(),
                                      uniform.as<const double>(), old.as<const double>(), count, block,
                                      kept_out.as<int64_t>());
}

void ema_stats(In x_, In indices_, Out counts_out_, Out sums_out_, int num_threads) {
  const ArrayArg x = describe("x", x_);
  const auto [n, d] = check_x(x);
  const ArrayArg indices = describe("indices", indices_);
  check_rows(indices, "int64", n);
  const ArrayArg counts_out = describe("counts_out", counts_out_);
  check_array(counts_out, "float32");
  check_shape(counts_out, {kAnySize}, "(K,)");
  const int64_t k = counts_out.size(0);
  const ArrayArg sums_out = describe("sums_out", sums_out_);
  check_array(sums_out, "float32");
  check_shape_k_d(sums_out, k, d, "K == counts_out.shape[0]");
  fastvq::checks::check_indices("indices", indices.as<int64_t>(), n, k, eq("K == counts_out.shape[0]", k));

  nb::gil_scoped_release release;
  fastvq::cpu::ema_stats(x.as<const float>(), n, d, indices.as<const int64_t>(), k, counts_out.as<float>(),
                         sums_out.as<float>(), num_threads);
}

void quantize_backward(std::optional<In> grad_quantized_, In x_, In codebook_, In indices_,
                       double commit_scale, double codebook_scale, std::optional<Out> grad_x_out_,
                       std::optional<Out> grad_codebook_out_, int num_threads, bool rotation_trick) {
  const ArrayArg x = describe("x", x_);
  const auto [n, d] = check_x(x);
  const std::optional<ArrayArg> grad_quantized = describe("grad_quantized", grad_quantized_);
  if (grad_quantized) check_rows_by_d(*grad_quantized, n, d);
  const ArrayArg codebook = describe("codebook", codebook_);
  const int64_t k = check_codebook(codebook, d);
  const ArrayArg indices = describe("indices", indices_);
  check_rows(indices, "int64", n);
  const std::optional<ArrayArg> grad_x_out = describe("grad_x_out", grad_x_out_);
  if (grad_x_out) check_rows_by_d(*grad_x_out, n, d);
  const std::optional<ArrayArg> grad_codebook_out = describe("grad_codebook_out", grad_codebook_out_);
  if (grad_codebook_out) {
    check_array(*grad_codebook_out, "float32");
    check_shape_k_d(*grad_codebook_out, k, d, "K == codebook.shape[0]");
  }
  fastvq::checks::check_indices("indices", indices.as<int64_t>(), n, k, eq("K == codebook.shape[0]", k));

  nb::gil_scoped_release release;
  fastvq::cpu::quantize_backward(as_or_null<const float>(grad_quantized), x.as<const float>(), n, d,
                                 codebook.as<const float>(), k, indices.as<const int64_t>(),
                                 static_cast<float>(commit_scale), static_cast<float>(codebook_scale), rotation_trick,
                                 as_or_null<float>(grad_x_out), as_or_null<float>(grad_codebook_out), num_threads);
}

void residual_level_backward(In grad_quantized_, Out residual_, In codebook_, In indices_, double commit_scale,
                             bool rotation_trick, bool accumulate, Out grad_x_, std::optional<Out> tiny_out_,
                             int num_threads) {
  const ArrayArg residual = describe("residual", residual_);
  const auto [n, d] = check_x(residual);
  const ArrayArg grad_quantized = describe("grad_quantized", grad_quantized_);
  check_rows_by_d(grad_quantized, n, d);
  const ArrayArg codebook = describe("codebook", codebook_);
  const int64_t k = check_codebook(codebook, d);
  const ArrayArg indices = describe("indices", indices_);
  check_rows(indices, "int64", n);
  const ArrayArg grad_x = describe("grad_x", grad_x_);
  check_rows_by_d(grad_x, n, d);
  const std::optional<ArrayArg> tiny_out = describe("tiny_out", tiny_out_);
  if (tiny_out) check_rows(*tiny_out, "uint8", n);
  fastvq::checks::check_indices("indices", indices.as<int64_t>(), n, k, eq("K == codebook.shape[0]", k));

  nb::gil_scoped_release release;
  fastvq::cpu::residual_level_backward(grad_quantized.as<const float>(), residual.as<float>(), n, d,
                                       codebook.as<const float>(), k, indices.as<const int64_t>(),
                                       static_cast<float>(commit_scale), rotation_trick, accumulate,
                                       tiny_out.has_value(), grad_x.as<float>(), as_or_null<uint8_t>(tiny_out),
                                       num_threads);
}

}  // namespace

NB_MODULE(_cpu, m) {
  m.doc() = "fastvq CPU kernels (OpenMP + run-time AVX2 dispatch). Arrays: float32/int64, C-contiguous, CPU.\n"
            "Bindings: csrc/cpu/bindings.cpp; each kernel names its source file.";

  m.def("nearest_code", &nearest_code, "x"_a, "codebook"_a, "indices_out"_a, "sqdist_out"_a,
        "quantized_out"_a = nb::none(), "num_threads"_a = 0, nb::kw_only(),
        "cache_key"_a = std::vector<int64_t>(), "hint"_a = nb::none(), "rows_key"_a = std::vector<int64_t>(),
        "indices_out[i] = argmin_k ||x[i] - codebook[k]||^2 (ties -> lowest k), sqdist_out[i] = that\n"
        "squared distance (computed directly), quantized_out[i] = codebook[indices_out[i]] if given.\n"
        "num_threads <= 0 uses the OpenMP default. The search runs around search_centre(codebook); a\n"
        "finite code or row too far from it raises ValueError. cache_key (ints that change whenever the\n"
        "caller's codebook may have: identity, data pointer, shape, strides, version) reuses a cached pack;\n"
        "empty: pack afresh. hint (int64 (N,), optional): a guess of each row's code (e.g. its last k-means\n"
        "assignment) where the int8 prefilter starts its scan; any hint gives the same outputs. rows_key (x's\n"
        "cache_key): a hinted call of >= 1024 rows keeps its int8 rows for the next hinted call with the same\n"
        "rows_key and search centre (k-means), which skips quantizing them; the outputs are the same.\n"
        "Source: csrc/cpu/nearest_code.cpp (micro-kernels: csrc/cpu/search_tile_*.cpp).");
  m.def("nearest_codes", &nearest_codes, "x"_a, "codebook"_a, "indices_out"_a, "sqdist_out"_a, "num_threads"_a = 0,
        nb::kw_only(), "cache_key"_a = std::vector<int64_t>(),
        "Row i's topk = indices_out.shape[1] nearest codes (1 <= topk <= min(K, 64)), nearest first, ties to\n"
        "the lower index, into indices_out[i] and their squared distances (computed directly) into\n"
        "sqdist_out[i]. Non-finite distances count as +inf. Bitwise identical for any num_threads;\n"
        "cache_key and the search centre as in nearest_code.\n"
        "Source: csrc/cpu/nearest_codes.cpp (micro-kernels: csrc/cpu/search_tile_*.cpp, search_tile_topk_*).");
  m.def("search_centre", &search_centre, "codebook"_a, "centre_out"_a, "num_threads"_a = 0,
        "centre_out = the per-dimension centre the searches run around (fastvq.numerics.search_centre's\n"
        "rule). Source: csrc/cpu/pack_codebook.cpp.");
  m.def("empty_cache", [] { return fastvq::cpu::empty_pack_cache() + fastvq::cpu::empty_kept_rows(); },
        "Drop every cached packed codebook and the kept int8 rows (nearest_code's rows_key); returns the bytes\n"
        "released (what a call is using is freed when it ends). Source: csrc/cpu/pack_codebook.cpp,\n"
        "csrc/cpu/prefilter_rows.cpp.");
  m.def(
      "release_rows",
      [](const std::vector<int64_t>& rows_key) {
        return fastvq::cpu::release_kept_rows({rows_key.data(), static_cast<int64_t>(rows_key.size())});
      },
      "rows_key"_a,
      "Drop the int8 rows nearest_code kept under this rows_key, if those are the ones it keeps; returns the\n"
      "bytes released. Source: csrc/cpu/prefilter_rows.cpp.");
  m.def("pack_cache_bytes", [] { return fastvq::cpu::pack_cache_bytes(); },
        "Bytes of packed codebooks the cache holds now (bounded by 256 MiB of idle packs).");
  m.def("sample_code", &sample_code, "x"_a, "codebook"_a, "indices_out"_a, "temperature"_a, "seed"_a, "cosine"_a,
        "num_threads"_a = 0,
        "indices_out[i] = argmin_k of vqp's -logit (sqrt(max(|x_i - e_k|^2, 1e-8)), or -x_i.e_k with cosine) minus\n"
        "float32(temperature * Gumbel noise hashed from (seed, i, k)), ties to the lowest k: a draw from\n"
        "softmax(logits / temperature), bit for bit fastvq.reference.sample_code's noise.\n"
        "Source: csrc/cpu/sample_code.cpp.");
  m.def("kmeanspp_accept", &kmeanspp_accept, "gram"_a, "norms"_a, "pool_rows"_a, "uniform"_a, "old"_a, "block"_a,
        "kept_out"_a,
        "k-means++'s block acceptance (fastvq.kmeans_seeding._accept): proposal i is kept when uniform[i] *\n"
        "old[i] < current[i], current starting at old and lowered by each kept proposal i to (norms[i] +\n"
        "norms[j]) - 2 gram[i, j] (0 where pool_rows[i] == pool_rows[j]) for the later proposals j; at most\n"
        "block kept. Writes their indices to kept_out, returns how many. Source: csrc/cpu/kmeanspp_accept.cpp.");
  m.def("ema_stats", &ema_stats, "x"_a, "indices"_a, "counts_out"_a, "sums_out"_a, "num_threads"_a = 0,
        "counts_out[k] = #{i: indices[i] == k}, sums_out[k] = sum of x[i] over those i (overwritten).\n"
        "Bitwise identical for any num_threads. Source: csrc/cpu/ema_stats.cpp.");
  m.def("quantize_backward", &quantize_backward, "grad_quantized"_a.none(), "x"_a, "codebook"_a,
        "indices"_a, "commit_scale"_a, "codebook_scale"_a, "grad_x_out"_a = nb::none(),
        "grad_codebook_out"_a = nb::none(), "num_threads"_a = 0, nb::kw_only(), "rotation_trick"_a = false,
        "grad_x_out = G + commit_scale * (x - codebook[indices]), G = grad_quantized (None = 0) or, with\n"
        "rotation_trick, the rotation trick's (|q|/|x|) R^T grad_quantized (fastvq.reference.quantize_backward);\n"
        "grad_codebook_out[k] = codebook_scale * sum over indices[i] == k of (codebook[k] - x[i]).\n"
        "Bitwise identical for any num_threads. Source: csrc/cpu/quantize_backward.cpp.");
  m.def("residual_level_backward", &residual_level_backward, "grad_quantized"_a, "residual"_a, "codebook"_a,
        "indices"_a, "commit_scale"_a, "rotation_trick"_a, "accumulate"_a, "grad_x"_a, "tiny_out"_a = nb::none(),
        "num_threads"_a = 0,
        "One level of ResidualVQ's greedy backward: grad_x = (accumulate: grad_x +) quantize_backward's grad_x\n"
        "of (grad_quantized, residual, codebook, indices, commit_scale, rotation_trick); with tiny_out (uint8,\n"
        "(N,)), residual -= codebook[indices] in place, except on rows flagged in tiny_out (rotation trick\n"
        "only: |residual| may be below eps, rebuilt by the caller). Source: csrc/cpu/residual_level_backward.cpp.");
  m.def("simd_level", [] { return std::string(fastvq::cpu::simd_level_name(fastvq::cpu::current_simd_level())); },
        "The nearest_code kernel the dispatcher picks now: 'avx512', 'avx2' or 'portable'.");
  m.def("best_simd_level", [] { return std::string(fastvq::cpu::simd_level_name(fastvq::cpu::best_simd_level())); },
        "The highest level this CPU and build support.");
  m.def("set_simd_level", [](const std::string& level) { fastvq::cpu::set_simd_level(level.c_str()); }, "level"_a,
        "Force 'portable', or 'avx2'/'avx512' if supported; 'auto' restores the best. ValueError otherwise.");
  m.def("fma_peak",
        [](const std::string& level, int num_threads, double seconds) {
          nb::gil_scoped_release release;
          return fastvq::cpu::fma_peak(level.c_str(), num_threads, seconds);
        },
        "level"_a = "", "num_threads"_a = 0, "seconds"_a = 0.2,
        "The machine's fp32 FMA peak in GFLOP/s: independent FMA chains on num_threads threads (<= 0: the\n"
        "OpenMP default) at `level` ('' = simd_level(), else 'portable', 'avx2' or 'avx512' if supported;\n"
        "ValueError otherwise), the best of 4 rounds of about seconds / 4. The benchmark's yardstick.\n"
        "Source: csrc/cpu/fma_peak.cpp (chains: csrc/cpu/fma_peak_avx2.cpp, fma_peak_avx512.cpp).");
  m.def("int8_product_ratio",
        [] {
          nb::gil_scoped_release release;
          return fastvq::cpu::int8_product_ratio();
        },
        "int8 multiply-adds per second (AVX-512 VNNI vpdpbusd) over fp32 multiply-adds per second (AVX-512 FMA)\n"
        "on one core, measured once per process (~1 ms, at the first call) and kept; 0.0 without AVX-512 VNNI.\n"
        "4.0 on an AMD Zen 5; about 2 expected where the 512-bit vpdpbusd issues at half the FMA's rate. The\n"
        "prefilter's 'auto' takes the VNNI scan from smaller codebooks where it is at least 3\n"
        "(prefilter_reason). Source: csrc/cpu/int8_speed.cpp.");
  m.def("fma_burst",
        [](const std::string& level, int num_threads, int64_t rounds) {
          nb::gil_scoped_release release;
          return fastvq::cpu::fma_burst(level.c_str(), num_threads, rounds);
        },
        "level"_a = "", "num_threads"_a = 0, "rounds"_a = 1 << 16,
        "One burst of the same FMA chains as fma_peak, `rounds` rounds on each of num_threads threads, untimed:\n"
        "returns the flops done (ValueError on a bad level or rounds outside [1, 2^40]). The benchmark times it\n"
        "in each CPU case's alternating rounds. Source: csrc/cpu/fma_peak.cpp.");
  m.def("set_prefilter", &fastvq::cpu::set_prefilter_mode, "mode"_a,
        "nearest_code's int8 prefilter (AVX2, AVX-512 VNNI or AMX-INT8; exact: bitwise the float32 search's\n"
        "outputs): 'auto' (default: where prefilter_reason is empty), 'always' (any shape the kernel takes),\n"
        "or 'off'. "
        "ValueError otherwise. Source: csrc/cpu/nearest_code_prefilter.cpp.");
  m.def("prefilter_mode", &fastvq::cpu::prefilter_mode, "The mode set_prefilter set: 'auto', 'always' or 'off'.");
  m.def("set_prefilter_kernel", &fastvq::cpu::set_prefilter_kernel, "kernel"_a,
        "The prefilter scan's kernel: 'auto' (at SIMD level avx512, AMX-INT8 tiles where the CPU and OS allow,\n"
        "else AVX-512 VNNI, VNNI for a call of fewer than 12 rows; at level avx2, AVX2), 'vnni', 'amx' or\n"
        "'avx2' (the AVX2 scan at level avx512 too); ValueError where unavailable. Same outputs.");
  m.def("prefilter_kernel", &fastvq::cpu::prefilter_kernel,
        "The scan kernel the prefilter uses now for calls of 12 rows or more: 'amx', 'vnni', 'avx2', or ''\n"
        "(none at this SIMD level: prefilter_reason says why).");
  m.def("prefilter_reason", &fastvq::cpu::prefilter_reason, "n"_a, "k"_a, "d"_a,
        "Why nearest_code of n rows against K codes of dimension d runs without the prefilter now; '' when\n"
        "it tries it (a call can still decline at run time: prefilter_stats).");
  m.def("prefilter_stats",
        [] {
          const fastvq::cpu::PrefilterStats s = fastvq::cpu::prefilter_stats();
          nb::dict out;
          out["calls"] = s.calls;
          out["rows_in_full"] = s.rows_in_full;
          out["declined"] = s.declined;
          out["codes_kept"] = s.codes_kept;
          out["candidates"] = s.candidates;
          out["deferred"] = s.deferred;
          out["amx_calls"] = s.amx_calls;
          out["kept_rows_calls"] = s.kept_rows_calls;
          return out;
        },
        "Counts since import: calls answered through the prefilter, rows of those searched over every panel\n"
        "(their candidates overflowed), and calls that declined it at run time (a non-finite or out-of-range\n"
        "row, or scales out of float32's normal range) and ran the full search, the codes the scan listed as\n"
        "candidates, those scored again in float32 (within the final threshold), and 'auto' calls that ran the\n"
        "float32 search rather than build a fresh codebook's int8 copy for fewer than 256 rows; amx_calls:\n"
        "the answered calls whose scan ran on AMX tiles; kept_rows_calls: those that took their rows' int8\n"
        "copy from an earlier call (rows_key).");
  m.def("openmp_enabled", &fastvq::cpu::openmp_enabled);
  m.def("max_threads", &fastvq::cpu::max_threads);
}
