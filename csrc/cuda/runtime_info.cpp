// Versions of the CUDA runtime this extension was linked with and of the installed driver,
// for `python -m fastvq.info`. Plain C++ against the runtime's C API: no nvcc needed.
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#include "cuda/kernels.h"

namespace fastvq::cuda {

std::string runtime_version() {
  int v = 0;
  const cudaError_t status = cudaRuntimeGetVersion(&v);
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("fastvq._cuda: cudaRuntimeGetVersion failed: ") + cudaGetErrorName(status));
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

std::string driver_version() {
  int v = 0;
  const cudaError_t status = cudaDriverGetVersion(&v);
  if (status != cudaSuccess) return std::string("unknown (") + cudaGetErrorName(status) + ")";
  if (v == 0) return "none (no CUDA driver installed)";
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

}  // namespace fastvq::cuda
