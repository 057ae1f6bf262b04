#include <algorithm>
#include <stdexcept>

#include "common/cuda_check.cuh"
#include "common/smoke.h"

namespace sharnn {

namespace {
constexpr int kAddScalarThreads = 256;
// Enough blocks to fill any current GPU; the grid-stride loop covers larger n.
constexpr std::int64_t kAddScalarMaxBlocks = 4096;
}  // namespace

// No __restrict__: out and in may be the same buffer (in-place add).
__global__ void add_scalar_f32_kernel(float* out, const float* in, std::int64_t n, float value) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    out[i] = in[i] + value;
  }
}

void add_scalar_f32(std::uintptr_t out, std::uintptr_t in, std::int64_t n, float value,
                    std::uintptr_t stream) {
  if (n < 0) throw std::invalid_argument("add_scalar_f32: n must be >= 0");
  if (n == 0) return;  // a launch with 0 blocks is an error
  if (out == 0 || in == 0) throw std::invalid_argument("add_scalar_f32: null data pointer");
  const auto blocks = static_cast<unsigned>(
      std::min((n + kAddScalarThreads - 1) / kAddScalarThreads, kAddScalarMaxBlocks));
  add_scalar_f32_kernel<<<blocks, kAddScalarThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<float*>(out), reinterpret_cast<const float*>(in), n, value);
  SHARNN_CUDA_CHECK_LAUNCH("add_scalar_f32_kernel");
}

}  // namespace sharnn
