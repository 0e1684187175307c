// Argument checks shared by the CPU and CUDA bindings.
//
// Every failure throws std::invalid_argument (nanobind turns it into ValueError) with a
// message that names the argument and says what was expected and what was given, e.g.
//   codebook must have shape (K, d) with d == x.shape[1] == 64, got (10, 63)
// Plain C++ (no nanobind, no CUDA): a binding fills an ArrayArg from whatever it received
// (common/nb_args.h), checks it here, and hands the kernel its typed data pointer.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace fastvq::checks {

// What a binding knows about one array argument.
struct ArrayArg {
  std::string name;              // the Python argument name, used in messages
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements
  std::string dtype;             // "float32", "int64", "bfloat16", ...
  std::string device_type;       // "cpu", "cuda", ...
  int device_id = 0;
  void* data = nullptr;

  int64_t ndim() const { return static_cast<int64_t>(shape.size()); }
  int64_t size(int64_t dim) const { return shape.at(static_cast<size_t>(dim)); }
  std::string device() const {
    return device_type == "cpu" ? device_type : device_type + ":" + std::to_string(device_id);
  }
  // The data as T*; valid once the dtype has been checked.
  template <typename T>
  T* as() const { return static_cast<T*>(data); }
};

// An optional argument's data as T*, or nullptr when it was not given.
template <typename T>
T* as_or_null(const std::optional<ArrayArg>& a) {
  return a ? a->as<T>() : nullptr;
}

// Marks a dimension that may have any size in check_shape.
constexpr int64_t kAnySize = -1;

[[noreturn]] inline void fail(const std::string& message) { throw std::invalid_argument(message); }

inline std::string tuple_str(const std::vector<int64_t>& values) {
  std::string s = "(";
  for (size_t i = 0; i < values.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(values[i]);
  }
  if (values.size() == 1) s += ",";
  return s + ")";
}

// True if the array is laid out row-major with no gaps. Dimensions of size 1 may carry any
// stride (torch gives them arbitrary ones), and an empty array is always contiguous.
inline bool is_c_contiguous(const ArrayArg& a) {
  int64_t expected = 1;
  for (int64_t i = a.ndim() - 1; i >= 0; --i) {
    const int64_t n = a.shape[static_cast<size_t>(i)];
    if (n == 0) return true;
    if (n != 1 && a.strides[static_cast<size_t>(i)] != expected) return false;
    expected *= n;
  }
  return true;
}

// `what == value`, for the `because` of a message: eq("N == x.shape[0]", 128).
inline std::string eq(const std::string& what, int64_t value) { return what + " == " + std::to_string(value); }

// `codebook must have dtype float16 (x's dtype), got float32`; `because` may be empty.
inline void check_dtype(const ArrayArg& a, const std::string& dtype, const std::string& because = "") {
  if (a.dtype != dtype)
    fail(a.name + " must have dtype " + dtype + (because.empty() ? "" : " (" + because + ")") + ", got " + a.dtype);
}

inline void check_contiguous(const ArrayArg& a) {
  if (!is_c_contiguous(a))
    fail(a.name + " must be C-contiguous, got strides " + tuple_str(a.strides) + " for shape " +
         tuple_str(a.shape));
}

// Device, dtype and layout: `x must have dtype float32, got float64`.
inline void check_array(const ArrayArg& a, const char* dtype, const char* device_type = "cpu") {
  if (a.device_type != device_type)
    fail(a.name + " must be on device " + device_type + ", got device " + a.device());
  check_dtype(a, dtype);
  check_contiguous(a);
}

// `pattern` spells the expected shape ("(K, d)"); `because` says where the sizes come from
// ("d == x.shape[1] == 64"). Expected entries equal to kAnySize match any size.
inline void check_shape(const ArrayArg& a, std::initializer_list<int64_t> expected,
                        const std::string& pattern, const std::string& because = "") {
  bool ok = a.ndim() == static_cast<int64_t>(expected.size());
  if (ok) {
    size_t i = 0;
    for (int64_t e : expected) {
      if (e != kAnySize && a.shape[i] != e) ok = false;
      ++i;
    }
  }
  if (!ok)
    fail(a.name + " must have shape " + pattern + (because.empty() ? "" : " with " + because) +
         ", got " + tuple_str(a.shape));
}

// Shapes shared by the ops: x is (N, d), the codebook (K, d).

// x (N, d) with d >= 1; returns (N, d).
inline std::pair<int64_t, int64_t> check_x_shape(const ArrayArg& x) {
  check_shape(x, {kAnySize, kAnySize}, "(N, d)");
  if (x.size(1) < 1) fail(x.name + " must have shape (N, d) with d >= 1, got " + tuple_str(x.shape));
  return {x.size(0), x.size(1)};
}

// codebook (K, d) with d == x.shape[1] and 1 <= K <= max_k; `max_k_text` spells the bound
// for the message ("K < 2**31"). Returns K.
inline int64_t check_codebook_shape(const ArrayArg& codebook, int64_t d, int64_t max_k, const char* max_k_text) {
  check_shape(codebook, {kAnySize, d}, "(K, d)", eq("d == x.shape[1]", d));
  const int64_t k = codebook.size(0);
  if (k < 1) fail(codebook.name + " must have shape (K, d) with K >= 1, got " + tuple_str(codebook.shape));
  if (k > max_k) fail(codebook.name + " must have " + max_k_text + " rows, got K == " + std::to_string(k));
  return k;
}

// One entry per row of x: (N,).
inline void check_shape_n(const ArrayArg& a, int64_t n) { check_shape(a, {n}, "(N,)", eq("N == x.shape[0]", n)); }

// One d-vector per row of x: (N, d).
inline void check_shape_n_d(const ArrayArg& a, int64_t n, int64_t d) {
  check_shape(a, {n, d}, "(N, d)", eq("N == x.shape[0]", n) + " and " + eq("d == x.shape[1]", d));
}

// One d-vector per code: (K, d); `k_from` says where K comes from ("K == codebook.shape[0]").
inline void check_shape_k_d(const ArrayArg& a, int64_t k, int64_t d, const std::string& k_from) {
  check_shape(a, {k, d}, "(K, d)", eq(k_from, k) + " and " + eq("d == x.shape[1]", d));
}

// Every index in [0, num_codes); a serial pass, so it may throw (never from a parallel region).
// `bound` says where num_codes comes from, e.g. "K == counts_out.shape[0] == 10".
inline void check_indices(const char* name, const int64_t* indices, int64_t n, int64_t num_codes,
                          const std::string& bound) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = indices[i];
    if (v < 0 || v >= num_codes)
      fail(std::string(name) + " must be in [0, K) with " + bound + ", got " + name + "[" +
           std::to_string(i) + "] == " + std::to_string(v));
  }
}

}  // namespace fastvq::checks
