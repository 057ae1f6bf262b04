// The smallest kernel with the same launch path as the real ones: Python passes raw data pointers
// and torch's current stream as integers, the kernel runs on that stream and never sees torch.
#pragma once

#include <cstdint>

namespace sharnn {

// out[i] = in[i] + value for i < n (out may equal in), launched on the cudaStream_t `stream`.
void add_scalar_f32(std::uintptr_t out, std::uintptr_t in, std::int64_t n, float value,
                    std::uintptr_t stream);

}  // namespace sharnn
