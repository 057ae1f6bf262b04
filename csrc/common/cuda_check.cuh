// Torch-free CUDA error checks for host code. A failure throws std::runtime_error, which pybind11
// turns into a Python RuntimeError, so a failed CUDA call reaches Python with its location and
// reason instead of aborting the process.
#pragma once

#include <cuda_runtime.h>

#include <sstream>
#include <stdexcept>

namespace sharnn {

inline void cuda_check(cudaError_t err, const char* expr, const char* file, int line) {
  if (err == cudaSuccess) return;
  std::ostringstream msg;
  msg << "CUDA error " << cudaGetErrorName(err) << ": " << cudaGetErrorString(err) << "\n  in "
      << expr << " at " << file << ":" << line;
  if (err == cudaErrorNoKernelImageForDevice) {
    msg << "\n  sharnn_fast was compiled for other GPU architectures than this one; rebuild with "
           "SHARNN_CUDA_ARCHS listing it (e.g. SHARNN_CUDA_ARCHS=\"86-real\" pip install .)";
  }
  throw std::runtime_error(msg.str());
}

}  // namespace sharnn

// SHARNN_CUDA_CHECK(cudaMemsetAsync(...)): throws if the call did not return cudaSuccess.
#define SHARNN_CUDA_CHECK(expr) ::sharnn::cuda_check((expr), #expr, __FILE__, __LINE__)

// Call right after kernel<<<...>>>: a bad launch (grid/block size, too many resources, no kernel
// image for this GPU) is only reported through cudaGetLastError, which also clears it so that a
// later unrelated call does not see it. Faults inside the kernel surface later, at the next
// synchronizing call.
#define SHARNN_CUDA_CHECK_LAUNCH(kernel_name) \
  ::sharnn::cuda_check(cudaGetLastError(), "launch of " kernel_name, __FILE__, __LINE__)
