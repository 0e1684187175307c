// Argument checks shared by the CPU and CUDA bindings.
//
// Every failure throws std::invalid_argument (nanobind turns it into ValueError) with a
// message that names the argument and says what was expected and what was given, e.g.
//   codebook must have shape (K, d) with d == x.shape[1] == 64, got (10, 63)
// Plain C++ (no nanobind, no CUDA): a binding fills an ArrayArg from whatever it received.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
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
};

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

// Device, dtype and layout: `x must have dtype float32, got float64`.
inline void check_array(const ArrayArg& a, const char* dtype, const char* device_type = "cpu") {
  if (a.device_type != device_type)
    fail(a.name + " must be on device " + device_type + ", got device " + a.device());
  if (a.dtype != dtype) fail(a.name + " must have dtype " + dtype + ", got " + a.dtype);
  if (!is_c_contiguous(a))
    fail(a.name + " must be C-contiguous, got strides " + tuple_str(a.strides) + " for shape " +
         tuple_str(a.shape));
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
