// Facts about the CUDA driver and devices, for build_info() and for choosing a backend.
// Plain C++ types only, so that bindings.cpp needs no CUDA headers.
#pragma once

namespace sharnn {

// Number of visible CUDA devices; 0 (not an error) when there is no GPU or no usable driver.
int cuda_device_count();
// CUDA runtime version this module was linked with (statically), e.g. 13000 for 13.0.
int cuda_runtime_version();
// Newest CUDA version the installed driver supports, e.g. 13000; 0 without a driver.
int cuda_driver_version();

}  // namespace sharnn
