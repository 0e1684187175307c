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
using fastvq::checks::as_or_null;
using fastvq::checks::check_shape;
using fastvq::checks::check_shape_k_d;
using fastvq::checks::check_shape_n;
using fastvq::checks::check_shape_n_d;
using fastvq::checks::eq;
using fastvq::checks::fail;
using fastvq::checks::kAnySize;
using fastvq::checks::tuple_str;
using fastvq::cuda::DType;
using fastvq::cuda::Strided;
using fastvq::nbargs::describe;
using fastvq::nbargs::In;
using fastvq::nbargs::Out;

namespace {

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

// On the call's device, of this dtype, C-contiguous.
void check_array(const ArrayArg& a, const std::string& dtype, Device& device, const std::string& because = "") {
  device.check(a);
  fastvq::checks::check_dtype(a, dtype, because);
  fastvq::checks::check_contiguous(a);
}

Strided strided(const ArrayArg& a) { return {a.data, a.strides[0], a.strides[1]}; }

// x (N, d), any strides; returns (N, d).
std::pair<int64_t, int64_t> check_x(const ArrayArg& x, Device& device) {
  device.check(x);
  float_dtype(x);
  const auto [n, d] = fastvq::checks::check_x_shape(x);
  if ((d + 31) / 32 > 65535) fail("x must have d <= 2097120 columns, got d == " + std::to_string(d));
  return {n, d};
}

// A contiguous (K, d) array of x's dtype; returns K.
int64_t check_codebook(const ArrayArg& codebook, const ArrayArg& x, int64_t d, Device& device) {
  check_array(codebook, x.dtype, device, "x's dtype");
  return fastvq::checks::check_codebook_shape(codebook, d, std::numeric_limits<int32_t>::max(), "K < 2**31");
}

void nearest_code(In x_, In codebook_, In centre_, Out code_norms_scratch_, Out indices_out_, Out sqdist_out_,
                  Out first_bad_row_, std::optional<Out> quantized_out_, std::uintptr_t stream) {
  Device device;
  const ArrayArg x = describe("x", x_);
  const auto [n, d] = check_x(x, device);
  const ArrayArg codebook = describe("codebook", codebook_);
  const int64_t k = check_codebook(codebook, x, d, device);
  const ArrayArg centre = describe("centre", centre_);
  check_array(centre, "float32", device);
  check_shape(centre, {d}, "(d,)", eq("d == x.shape[1]", d));
  const ArrayArg norms = describe("code_norms_scratch", code_norms_scratch_);
  check_array(norms, "float32", device);
  check_shape(norms, {k}, "(K,)", eq("K == codebook.shape[0]", k));
  const ArrayArg indices_out = describe("indices_out", indices_out_);
  check_array(indices_out, "int64", device);
  check_shape_n(indices_out, n);
  const ArrayArg sqdist_out = describe("sqdist_out", sqdist_out_);
  check_array(sqdist_out, "float32", device);
  check_shape_n(sqdist_out, n);
  const ArrayArg first_bad_row = describe("first_bad_row", first_bad_row_);
  check_array(first_bad_row, "int64", device);
  check_shape(first_bad_row, {1}, "(1,)");
  const std::optional<ArrayArg> quantized_out = describe("quantized_out", quantized_out_);
  if (quantized_out) {
    check_array(*quantized_out, x.dtype, device);
    check_shape_n_d(*quantized_out, n, d);
  }

  nb::gil_scoped_release release;
  fastvq::cuda::nearest_code(device.id(), stream, float_dtype(x), strided(x), n, d, codebook.data, k,
                             centre.as<const float>(), norms.as<float>(), indices_out.as<int64_t>(),
                             sqdist_out.as<float>(), as_or_null<void>(quantized_out), first_bad_row.as<int64_t>());
}

void ema_stats(In x_, In indices_, Out counts_out_, Out sums_out_, std::uintptr_t stream) {
  Device device;
  const ArrayArg x = describe("x", x_);
  const auto [n, d] = check_x(x, device);
  const ArrayArg indices = describe("indices", indices_);
  check_array(indices, "int64", device);
  check_shape_n(indices, n);
  const ArrayArg counts_out = describe("counts_out", counts_out_);
  check_array(counts_out, "int64", device);
  check_shape(counts_out, {kAnySize}, "(K,)");
  const int64_t k = counts_out.size(0);
  const ArrayArg sums_out = describe("sums_out", sums_out_);
  check_array(sums_out, "float64", device);
  check_shape_k_d(sums_out, k, d, "K == counts_out.shape[0]");

  nb::gil_scoped_release release;
  fastvq::cuda::ema_stats(device.id(), stream, float_dtype(x), strided(x), n, d, indices.as<const int64_t>(), k,
                          counts_out.as<int64_t>(), sums_out.as<double>());
}

void segment_sum(In x_, In perm_, In offsets_, Out out_, std::optional<In> codebook_, std::uintptr_t stream) {
  Device device;
  const ArrayArg x = describe("x", x_);
  const auto [n, d] = check_x(x, device);
  const ArrayArg perm = describe("perm", perm_);
  check_array(perm, "int64", device);
  check_shape_n(perm, n);
  const ArrayArg out = describe("out", out_);
  check_array(out, "float32", device);
  check_shape(out, {kAnySize, d}, "(K, d)", eq("d == x.shape[1]", d));
  const int64_t k = out.size(0);
  if (k < 1 || k > std::numeric_limits<int32_t>::max())
    fail("out must have shape (K, d) with 1 <= K < 2**31, got " + tuple_str(out.shape));
  const ArrayArg offsets = describe("offsets", offsets_);
  check_array(offsets, "int64", device);
  check_shape(offsets, {k + 1}, "(K + 1,)", eq("K + 1 == out.shape[0] + 1", k + 1));
  const std::optional<ArrayArg> codebook = describe("codebook", codebook_);
  if (codebook) check_codebook(*codebook, x, d, device);
  if (codebook && codebook->size(0) != k)
    fail("codebook must have shape (K, d) with " + eq("K == out.shape[0]", k) + ", got " + tuple_str(codebook->shape));

  nb::gil_scoped_release release;
  fastvq::cuda::segment_sum(device.id(), stream, float_dtype(x), strided(x), d, perm.as<const int64_t>(),
                            offsets.as<const int64_t>(), k, as_or_null<const void>(codebook), out.as<float>());
}

void quantize_backward(In grad_quantized_, In x_, In codebook_, In indices_, In commit_scale_,
                       std::optional<Out> grad_x_out_, std::optional<Out> grad_codebook_out_, std::uintptr_t stream,
                       bool rotation_trick) {
  Device device;
  const ArrayArg x = describe("x", x_);
  const auto [n, d] = check_x(x, device);
  const ArrayArg grad_quantized = describe("grad_quantized", grad_quantized_);  // any strides, like x
  device.check(grad_quantized);
  fastvq::checks::check_dtype(grad_quantized, x.dtype, "x's dtype");
  check_shape_n_d(grad_quantized, n, d);
  const ArrayArg codebook = describe("codebook", codebook_);
  const int64_t k = check_codebook(codebook, x, d, device);
  const ArrayArg indices = describe("indices", indices_);
  check_array(indices, "int64", device);
  check_shape_n(indices, n);
  const ArrayArg commit_scale = describe("commit_scale", commit_scale_);
  device.check(commit_scale);
  fastvq::checks::check_dtype(commit_scale, "float32");
  if (commit_scale.ndim() != 0 && !(commit_scale.ndim() == 1 && commit_scale.size(0) == 1))
    fail("commit_scale must be a 0-dim tensor, got shape " + tuple_str(commit_scale.shape));
  const std::optional<ArrayArg> grad_x_out = describe("grad_x_out", grad_x_out_);
  if (grad_x_out) {
    check_array(*grad_x_out, x.dtype, device);
    check_shape_n_d(*grad_x_out, n, d);
  }
  const std::optional<ArrayArg> grad_codebook_out = describe("grad_codebook_out", grad_codebook_out_);
  if (grad_codebook_out) {
    check_array(*grad_codebook_out, "float64", device);
    check_shape_k_d(*grad_codebook_out, k, d, "K == codebook.shape[0]");
  }

  nb::gil_scoped_release release;
  fastvq::cuda::quantize_backward(device.id(), stream, float_dtype(x), strided(grad_quantized), strided(x), n, d,
                                  codebook.data, indices.as<const int64_t>(), k, commit_scale.as<const float>(),
                                  rotation_trick, as_or_null<void>(grad_x_out), as_or_null<double>(grad_codebook_out));
}

}  // namespace

NB_MODULE(_cuda, m) {
  m.doc() = "fastvq CUDA kernels. Tensors: CUDA, one device; x float32/float16/bfloat16 with any strides.\n"
            "Work is enqueued on `stream` (torch.cuda.current_stream(device).cuda_stream).\n"
            "Bindings: csrc/cuda/bindings.cpp; each kernel names its source file.";

  m.def("nearest_code", &nearest_code, "x"_a, "codebook"_a, "centre"_a, "code_norms_scratch"_a, "indices_out"_a,
        "sqdist_out"_a, "first_bad_row"_a, "quantized_out"_a = nb::none(), nb::kw_only(), "stream"_a,
        "indices_out[i] = argmin_k ||x[i] - codebook[k]||^2 (ties -> lowest k; non-finite distance = +inf),\n"
        "searched around centre (float32 (d,), fastvq.numerics.search_centre); sqdist_out[i] = that squared\n"
        "distance computed directly (float32), quantized_out[i] = codebook[idx]. code_norms_scratch: float32\n"
        "(K,), overwritten with ||e - c||^2. first_bad_row: int64 (1,), set to N by the caller, lowered to the\n"
        "first finite row with ||x - c||^2 > FLT_MAX/8. Source: csrc/cuda/nearest_code.cu.");
  m.def("ema_stats", &ema_stats, "x"_a, "indices"_a, "counts_out"_a, "sums_out"_a, nb::kw_only(), "stream"_a,
        "counts_out[k] = #{i: indices[i] == k} (int64), sums_out[k] = sum of x[i] over those i (float64);\n"
        "64-bit atomics, overwritten. Indices outside [0, K) are ignored. Source: csrc/cuda/ema_stats.cu.");
  m.def("segment_sum", &segment_sum, "x"_a, "perm"_a, "offsets"_a, "out"_a, "codebook"_a = nb::none(), nb::kw_only(),
        "stream"_a,
        "Deterministic: out[k] = sum over s in [offsets[k], offsets[k+1]) of x[perm[s]], or of\n"
        "codebook[k] - x[perm[s]] when codebook is given (overwritten). Source: csrc/cuda/ema_stats.cu.");
  m.def("quantize_backward", &quantize_backward, "grad_quantized"_a, "x"_a, "codebook"_a, "indices"_a,
        "commit_scale"_a, "grad_x_out"_a = nb::none(), "grad_codebook_out"_a = nb::none(), nb::kw_only(), "stream"_a,
        "rotation_trick"_a = false,
        "grad_x_out = G + commit_scale * (x - codebook[indices]) in x's dtype, G = grad_quantized or, with\n"
        "rotation_trick, the rotation trick's (|q|/|x|) R^T grad_quantized (fastvq.reference.quantize_backward);\n"
        "grad_codebook_out[k] = sum over indices[i] == k of (codebook[k] - x[i]), float64 atomics (overwritten).\n"
        "Source: csrc/cuda/quantize_backward.cu.");
  m.def("built_archs", [] { return std::string(FASTVQ_CUDA_ARCHS); },
        "The CMAKE_CUDA_ARCHITECTURES this extension was compiled for, e.g. '80;90'.");
  m.def("runtime_version", &fastvq::cuda::runtime_version, "CUDA runtime version linked in, e.g. '13.0'.");
  m.def("driver_version", &fastvq::cuda::driver_version, "Installed CUDA driver's version, or why there is none.");
}
