// Describe a nanobind ndarray (a torch tensor or numpy array received through DLPack) as a
// checks::ArrayArg, so the binding can validate it with named, shaped messages.
//
// Bindings take untyped `nb::ndarray<>` on purpose: with typed ndarrays, a wrong dtype or
// device would become nanobind's generic "incompatible function arguments" TypeError
// instead of a message naming the argument.
#pragma once

#include <nanobind/ndarray.h>

#include <optional>
#include <string>

#include "common/checks.h"

namespace fastvq::nbargs {

namespace nb = nanobind;

using In = nb::ndarray<nb::ro>;  // read-only inputs (numpy read-only arrays accepted too)
using Out = nb::ndarray<>;       // outputs, written in place

inline std::string dtype_name(nb::dlpack::dtype t) {
  using code = nb::dlpack::dtype_code;
  std::string base;
  switch (static_cast<code>(t.code)) {
    case code::Int: base = "int"; break;
    case code::UInt: base = "uint"; break;
    case code::Float: base = "float"; break;
    case code::Bfloat: base = "bfloat"; break;
    case code::Complex: base = "complex"; break;
    case code::Bool: return "bool";
    default: base = "dtype_code_" + std::to_string(static_cast<int>(t.code)) + "_"; break;
  }
  std::string s = base + std::to_string(t.bits);
  if (t.lanes != 1) s += "x" + std::to_string(t.lanes);
  return s;
}

inline std::string device_type_name(int device_type) {
  switch (device_type) {
    case nb::device::cpu::value: return "cpu";
    case nb::device::cuda::value: return "cuda";
    case nb::device::cuda_host::value: return "cuda_host";
    case nb::device::cuda_managed::value: return "cuda_managed";
    case nb::device::rocm::value: return "rocm";
    case nb::device::metal::value: return "metal";
    default: return "device_type_" + std::to_string(device_type);
  }
}

template <typename... Args>
checks::ArrayArg describe(const char* name, const nb::ndarray<Args...>& a) {
  checks::ArrayArg out;
  out.name = name;
  out.shape.resize(a.ndim());
  out.strides.resize(a.ndim());
  for (size_t i = 0; i < a.ndim(); ++i) {
    out.shape[i] = static_cast<int64_t>(a.shape(i));
    out.strides[i] = a.stride(i);
  }
  out.dtype = dtype_name(a.dtype());
  out.device_type = device_type_name(a.device_type());
  out.device_id = a.device_id();
  out.data = const_cast<void*>(static_cast<const void*>(a.data()));
  return out;
}

template <typename... Args>
std::optional<checks::ArrayArg> describe(const char* name, const std::optional<nb::ndarray<Args...>>& a) {
  if (!a) return std::nullopt;
  return describe(name, *a);
}

}  // namespace fastvq::nbargs
