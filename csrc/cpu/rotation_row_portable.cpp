// The rotation trick's row math (rotation_row.inc) in plain C++: the version every build has, and the one
// the SIMD versions match bit for bit. GCC and Clang get pairs of doubles (vector extensions: SSE2 on
// x86-64, NEON on AArch64), others single doubles; the lanes and their tree are the same either way.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/rotation_row.h"

namespace fastvq::cpu {
namespace {

#if defined(__GNUC__)
struct Ops {
  using V = double __attribute__((vector_size(16)));
  using Floats = float __attribute__((vector_size(8)));
  static constexpr int W = 2;
  static V zero() { return V{0.0, 0.0}; }
  static V set1(double v) { return V{v, v}; }
  static V load(const float* p) {
    Floats f;
    std::memcpy(&f, p, sizeof f);
    return __builtin_convertvector(f, V);
  }
  static V load_d(const double* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store_d(double* p, V v) { std::memcpy(p, &v, sizeof v); }
  static void store(float* p, V v) {
    const Floats f = __builtin_convertvector(v, Floats);
    std::memcpy(p, &f, sizeof f);
  }
  static V add(V a, V b) { return a + b; }
  static V fma_exact(V a, V b, V c) { return a * b + c; }  // not fused: the file builds with -ffp-contract=off
  static V mul(V a, V b) { return a * b; }
  static double reduce(V v) { return v[0] + v[1]; }
};
#else
struct Ops {
  using V = double;
  static constexpr int W = 1;
  static V zero() { return 0.0; }
  static V set1(double v) { return v; }
  static V load(const float* p) { return *p; }
  static V load_d(const double* p) { return *p; }
  static void store_d(double* p, V v) { *p = v; }
  static void store(float* p, V v) { *p = static_cast<float>(v); }
  static V add(V a, V b) { return a + b; }
  static V fma_exact(V a, V b, V c) { return a * b + c; }
  static V mul(V a, V b) { return a * b; }
  static double reduce(V v) { return v; }
};
#endif

#include "cpu/rotation_row.inc"

}  // namespace

RotationCode rotation_code_portable(const float* q, int64_t d) { return code_impl(q, d); }

void rotation_rows_portable(const float* g, const float* x, const float* codebook, const int64_t* indices,
                         const RotationCode* codes, int64_t begin, int64_t end, int64_t d,
                         float commit_scale, double* scratch, float* out) {
  rows_impl(g, x, codebook, indices, codes, begin, end, d, commit_scale, scratch, out);
}

}  // namespace fastvq::cpu
