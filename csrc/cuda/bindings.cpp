// fastvq._cuda: nanobind bindings of the CUDA kernels (csrc/cuda/kernels.h).
//
// Arrays arrive through DLPack (torch CUDA tensors), all on one CUDA device; the work runs under
// that device and is enqueued on `stream`, the caller's cudaStream_t as an integer (Python:
// torch.cuda.current_stream(device).cuda_stream). Outputs are preallocated by the caller.
// Every argument is checked here (csrc/common/checks.h) before the GIL is released; a mismatch
// raises ValueError naming the argument, what was expected and what was given. CUDA errors
// raise RuntimeError naming the kernel and the CUDA error.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "common/checks.h"
#include "common/nb_args.h"
#include "cuda/kernels.h"

#ifndef FASTVQ_CUDA_ARCHS
#define FASTVQ_CUDA_ARCHS "unknown"
#endif

namespace nb = nanobind;
using namespace nb::literals;
using fastvq::checks::ArrayArg;
using fastvq::checks::check_shape;
using fastvq::checks::fail;
using fastvq::checks::is_c_contiguous;
using fastvq::checks::kAnySize;
using fastvq::checks::tuple_str;
using fastvq::cuda::DType;
using fastvq::cuda::Strided;
using fastvq::nbargs::describe;

namespace {

using In = nb::ndarray<nb::ro>;
using Out = nb::ndarray<>;

std::string eq(const char* what, int64_t value) { return std::string(what) + " == " + std::to_string(value); }

// All arrays of one call must live on the same CUDA device; the first one fixes it.
class Device {
 public:
  void check(const ArrayArg& a) {
    if (a.device_type != "cuda") fail(a.name + " must be a CUDA tensor, got device " + a.device());
    if (id_ < 0) {
      id_ = a.device_id;
      first_ = a.name;
    } else if (a.device_id != id_) {
      fail(a.name + " must be on " + first_ + "'s device cuda:" + std::to_string(id_) + ", got " + a.device());
    }
  }
  int id() const { return id_; }

 private:
  int id_ = -1;
  std::string first_;
};

DType float_dtype(const ArrayArg& a) {
  if (a.dtype == "float32") return DType::Float32;
  if (a.dtype == "float16") return DType::Float16;
  if (a.dtype == "bfloat16") return DType::BFloat16;
  fail(a.name + " must have dtype float32, float16 or bfloat16, got " + a.dtype);
}

void check_dtype(const ArrayArg& a, const std::string& dtype, const std::string& because = "") {
  if (a.dtype != dtype)
    fail(a.name + " must have dtype " + dtype + (because.empty() ? "" : " (" + because + ")") + ", got " + a.dtype);
}

void check_contiguous(const ArrayArg& a) {
  if (!is_c_contiguous(a))
    fail(a.name + " must be C-contiguous, got strides " + tuple_str(a.strides) + " for shape " + tuple_str(a.shape));
}

Strided strided(const ArrayArg& a) { return {a.data, a.strides[0], a.strides[1]}; }

// x (N, d), any strides; returns (N, d).
std::pair<int64_t, int64_t> check_x(const ArrayArg& x, Device& device) {
  device.check(x);
  float_dtype(x);
  check_shape(x, {kAnySize, kAnySize}, "(N, d)");
  if (x.size(1) < 1) fail("x must have shape (N, d) with d >= 1, got " + tuple_str(x.shape));
  if ((x.size(1) + 31) / 32 > 65535) fail("x must have d <= 2097120 columns, got d == " + std::to_string(x.size(1)));
  return {x.size(0), x.size(1)};
}

// A contiguous (K, d) array of x's dtype; returns K.
int64_t check_codebook(const ArrayArg& codebook, const ArrayArg& x, int64_t d, Device& device) {
  device.check(codebook);
  check_dtype(codebook, x.dtype, "x's dtype");
  check_contiguous(codebook);
  check_shape(codebook, {kAnySize, d}, "(K, d)", eq("d == x.shape[1]", d));
  const int64_t k = codebook.size(0);
  if (k < 1) fail("codebook must have shape (K, d) with K >= 1, got " + tuple_str(codebook.shape));
  if (k > std::numeric_limits<int32_t>::max())
    fail("codebook must have K < 2**31 rows, got K == " + std::to_string(k));
  return k;
}

void check_vector(const ArrayArg& a, const char* dtype, int64_t size, const std::string& because, Device& device) {
  device.check(a);
  check_dtype(a, dtype);
  check_contiguous(a);
  check_shape(a, {size}, "(" + std::to_string(size) + ",)", because);
}

void check_matrix(const ArrayArg& a, const std::string& dtype, int64_t rows, int64_t cols, const std::string& pattern,
                  const std::string& because, Device& device) {
  device.check(a);
  check_dtype(a, dtype);
  check_contiguous(a);
  check_shape(a, {rows, cols}, pattern, because);
}

void nearest_code(In x_, In codebook_, Out code_norms_scratch_, Out indices_out_, Out sqdist_out_,
                  std::optional<Out> quantized_out_, std::uintptr_t stream) {
  Device device;
  const ArrayArg x = describe("x", x_);
  const auto [n, d] = check_x(x, device);
  const ArrayArg codebook = describe("codebook", codebook_);
  const int64_t k = check_codebook(codebook, x, d, device);
  const ArrayArg norms = describe("code_norms_scratch", code_norms_scratch_);
  check_vector(norms, "float32", k, eq("K == codebook.shape[0]", k), device);
  const ArrayArg indices_out = describe("indices_out", indices_out_);
  check_vector(indices_out, "int64", n, eq("N == x.shape[0]", n), device);
  const ArrayArg sqdist_out = describe("sqdist_out", sqdist_out_);
  check_vector(sqdist_out, "float32", n, eq("N == x.shape[0]", n), device);
  const std::optional<ArrayArg> quantized_out = describe("quantized_out", quantized_out_);
  if (quantized_out)
    check_matrix(*quantized_out, x.dtype, n, d, "(N, d)", eq("N == x.shape[0]", n) + " and " + eq("d", d), device);

  nb::gil_scoped_release release;
  fastvq::cuda::nearest_code(device.id(), stream, float_dtype(x), strided(x), n, d, codebook.data, k,
                             static_cast<float*>(norms.data), static_cast<int64_t*>(indices_out.data),
                             static_cast<float*>(sqdist_out.data), quantized_out ? quantized_out->data : nullptr);
}

void ema_stats(In x_, In indices_, Out counts_out_, Out sums_out_, std::uintptr_t stream) {
  Device device;
  const ArrayArg x = describe("x", x_);
  const auto [n, d] = check_x(x, device);
  const ArrayArg indices = describe("indices", indices_);
  check_vector(indices, "int64", n, eq("N == x.shape[0]", n), device);
  const ArrayArg counts_out = describe("counts_out", counts_out_);
  device.check(counts_out);
  check_dtype(counts_out, "float32");
  check_contiguous(counts_out);
  check_shape(counts_out, {kAnySize}, "(K,)");
  const int64_t k = counts_out.size(0);
  const ArrayArg sums_out = describe("sums_out", sums_out_);
  check_matrix(sums_out, "float32", k, d, "(K, d)", eq("K == counts_out.shape[0]", k) + " and " + eq("d", d), device);

  nb::gil_scoped_release release;
  fastvq::cuda::ema_stats(device.id(), stream, float_dtype(x), strided(x), n, d,
                          static_cast<const int64_t*>(indices.data), k, static_cast<float*>(counts_out.data),
                          static_cast<float*>(sums_out.data));
}

void segment_sum(In x_, In perm_, In offsets_, Out out_, std::optional<In> codebook_, std::uintptr_t stream) {
  Device device;
  const ArrayArg x = describe("x", x_);
  const auto [n, d] = check_x(x, device);
  const ArrayArg perm = describe("perm", perm_);
  check_vector(perm, "int64", n, eq("N == x.shape[0]", n), device);
  const ArrayArg out = describe("out", out_);
  device.check(out);
  check_dtype(out, "float32");
  check_contiguous(out);
  check_shape(out, {kAnySize, d}, "(K, d)", eq("d == x.shape[1]", d));
  const int64_t k = out.size(0);
  if (k < 1 || k > std::numeric_limits<int32_t>::max())
    fail("out must have shape (K, d) with 1 <= K < 2**31, got " + tuple_str(out.shape));
  const ArrayArg offsets = describe("offsets", offsets_);
  check_vector(offsets, "int64", k + 1, eq("K + 1 == out.shape[0] + 1", k + 1), device);
  const std::optional<ArrayArg> codebook = describe("codebook", codebook_);
  if (codebook) check_codebook(*codebook, x, d, device);
  if (codebook && codebook->size(0) != k)
    fail("codebook must have shape (K, d) with " + eq("K == out.shape[0]", k) + ", got " + tuple_str(codebook->shape));

  nb::gil_scoped_release release;
  fastvq::cuda::segment_sum(device.id(), stream, float_dtype(x), strided(x), d, static_cast<const int64_t*>(perm.data),
                            static_cast<const int64_t*>(offsets.data), k, codebook ? codebook->data : nullptr,
                            static_cast<float*>(out.data));
}

void quantize_backward(In grad_quantized_, In x_, In codebook_, In indices_, In commit_scale_,
                       std::optional<Out> grad_x_out_, std::optional<Out> grad_codebook_out_, std::uintptr_t stream) {
  Device device;
  const ArrayArg x = describe("x", x_);
  const auto [n, d] = check_x(x, device);
  const ArrayArg grad_quantized = describe("grad_quantized", grad_quantized_);
  device.check(grad_quantized);
  check_dtype(grad_quantized, x.dtype, "x's dtype");
  check_shape(grad_quantized, {n, d}, "(N, d)", eq("N == x.shape[0]", n) + " and " + eq("d", d));
  const ArrayArg codebook = describe("codebook", codebook_);
  const int64_t k = check_codebook(codebook, x, d, device);
  const ArrayArg indices = describe("indices", indices_);
  check_vector(indices, "int64", n, eq("N == x.shape[0]", n), device);
  const ArrayArg commit_scale = describe("commit_scale", commit_scale_);
  device.check(commit_scale);
  check_dtype(commit_scale, "float32");
  if (commit_scale.ndim() != 0 && !(commit_scale.ndim() == 1 && commit_scale.size(0) == 1))
    fail("commit_scale must be a 0-dim tensor, got shape " + tuple_str(commit_scale.shape));
  const std::optional<ArrayArg> grad_x_out = describe("grad_x_out", grad_x_out_);
  if (grad_x_out)
    check_matrix(*grad_x_out, x.dtype, n, d, "(N, d)", eq("N == x.shape[0]", n) + " and " + eq("d", d), device);
  const std::optional<ArrayArg> grad_codebook_out = describe("grad_codebook_out", grad_codebook_out_);
  if (grad_codebook_out)
    check_matrix(*grad_codebook_out, "float32", k, d, "(K, d)", eq("K == codebook.shape[0]", k) + " and " + eq("d", d),
                 device);

  nb::gil_scoped_release release;
  fastvq::cuda::quantize_backward(device.id(), stream, float_dtype(x), strided(grad_quantized), strided(x), n, d,
                                  codebook.data, static_cast<const int64_t*>(indices.data), k,
                                  static_cast<const float*>(commit_scale.data),
                                  grad_x_out ? grad_x_out->data : nullptr,
                                  grad_codebook_out ? static_cast<float*>(grad_codebook_out->data) : nullptr);
}

}  // namespace

NB_MODULE(_cuda, m) {
  m.doc() = "fastvq CUDA kernels. Tensors: CUDA, one device; x float32/float16/bfloat16 with any strides.\n"
            "Work is enqueued on `stream` (torch.cuda.current_stream(device).cuda_stream).";

  m.def("nearest_code", &nearest_code, "x"_a, "codebook"_a, "code_norms_scratch"_a, "indices_out"_a, "sqdist_out"_a,
        "quantized_out"_a = nb::none(), nb::kw_only(), "stream"_a,
        "indices_out[i] = argmin_k ||x[i] - codebook[k]||^2 (ties -> lowest k; non-finite distance = +inf),\n"
        "sqdist_out[i] = that squared distance computed directly (float32), quantized_out[i] = codebook[idx].\n"
        "code_norms_scratch: float32 (K,), overwritten.");
  m.def("ema_stats", &ema_stats, "x"_a, "indices"_a, "counts_out"_a, "sums_out"_a, nb::kw_only(), "stream"_a,
        "counts_out[k] = #{i: indices[i] == k}, sums_out[k] = sum of x[i] over those i (float32 atomics;\n"
        "overwritten). Indices outside [0, K) are ignored.");
  m.def("segment_sum", &segment_sum, "x"_a, "perm"_a, "offsets"_a, "out"_a, "codebook"_a = nb::none(), nb::kw_only(),
        "stream"_a,
        "Deterministic: out[k] = sum over s in [offsets[k], offsets[k+1]) of x[perm[s]], or of\n"
        "codebook[k] - x[perm[s]] when codebook is given (overwritten).");
  m.def("quantize_backward", &quantize_backward, "grad_quantized"_a, "x"_a, "codebook"_a, "indices"_a,
        "commit_scale"_a, "grad_x_out"_a = nb::none(), "grad_codebook_out"_a = nb::none(), nb::kw_only(), "stream"_a,
        "grad_x_out = grad_quantized + commit_scale * (x - codebook[indices]) in x's dtype;\n"
        "grad_codebook_out[k] = sum over indices[i] == k of (codebook[k] - x[i]), float32 atomics (overwritten).");
  m.def("built_archs", [] { return std::string(FASTVQ_CUDA_ARCHS); },
        "The CMAKE_CUDA_ARCHITECTURES this extension was compiled for, e.g. '80;90'.");
  m.def("runtime_version", &fastvq::cuda::runtime_version, "CUDA runtime version linked in, e.g. '13.0'.");
  m.def("driver_version", &fastvq::cuda::driver_version, "Installed CUDA driver's version, or why there is none.");
}
