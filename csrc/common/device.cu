#include "common/cuda_check.cuh"
#include "common/device.h"

namespace sharnn {

namespace {
// What the runtime reports when this machine simply has no GPU or no driver; callers treat that as
// "0 devices", while any other error (e.g. a driver older than the runtime) is raised.
bool means_no_cuda(cudaError_t err) {
  return err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver ||
         err == cudaErrorStubLibrary;  // containers that ship only libcuda's stub
}
}  // namespace

int cuda_device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (means_no_cuda(err)) {
    cudaGetLastError();  // clear the error so that a later, unrelated check does not report it
    return 0;
  }
  cuda_check(err, "cudaGetDeviceCount", __FILE__, __LINE__);
  return count;
}

int cuda_runtime_version() {
  int version = 0;
  SHARNN_CUDA_CHECK(cudaRuntimeGetVersion(&version));
  return version;
}

int cuda_driver_version() {
  int version = 0;  // the runtime reports 0 when no driver is installed
  const cudaError_t err = cudaDriverGetVersion(&version);
  if (means_no_cuda(err)) {
    cudaGetLastError();
    return 0;
  }
  cuda_check(err, "cudaDriverGetVersion", __FILE__, __LINE__);
  return version;
}

}  // namespace sharnn
