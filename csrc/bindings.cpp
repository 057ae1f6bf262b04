// The module sharnn_fast._C: the only file that includes pybind11 (kernels and launchers stay plain
// C++/CUDA). Python reaches it only through sharnn_fast/_native.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sstream>
#include <string>
#include <utility>
#include <vector>

#ifdef SHARNN_WITH_CUDA
#include "common/device.h"
#include "common/smoke.h"
#endif

namespace py = pybind11;

// Build facts, passed by CMakeLists.txt as compile definitions of this file only.
#ifndef SHARNN_CXX_COMPILER
#define SHARNN_CXX_COMPILER "unknown"
#endif
#ifndef SHARNN_CUDA_COMPILER_VERSION
#define SHARNN_CUDA_COMPILER_VERSION ""
#endif
#ifndef SHARNN_CUDA_ARCHS
#define SHARNN_CUDA_ARCHS ""
#endif
#ifndef SHARNN_CUDA_REASON
#define SHARNN_CUDA_REASON ""
#endif

namespace {

std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> items;
  std::istringstream stream(text);
  for (std::string item; std::getline(stream, item, ',');) {
    if (!item.empty()) items.push_back(item);
  }
  return items;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sharnn_fast native kernels; use them through sharnn_fast._native";

  // Names ("<op>.<function>") of the kernels bound below, reported by build_info(). Binding through
  // def_kernel keeps this list and the module's functions from drifting apart.
  std::vector<std::string> kernels;
  auto def_kernel = [&m, &kernels](const char* op, const char* name, auto&& function,
                                   auto&&... extras) {
    m.def(name, std::forward<decltype(function)>(function),
          std::forward<decltype(extras)>(extras)...);
    kernels.push_back(std::string(op) + "." + name);
  };
  (void)def_kernel;  // unused in a build without CUDA

#ifdef SHARNN_WITH_CUDA
  m.def("cuda_device_count", &sharnn::cuda_device_count,
        "Visible CUDA devices; 0 when there is no GPU or driver");
  m.def("cuda_runtime_version", &sharnn::cuda_runtime_version,
        "CUDA runtime version linked into this module, e.g. 13000");
  m.def("cuda_driver_version", &sharnn::cuda_driver_version,
        "CUDA version supported by the driver, e.g. 13000; 0 without a driver");

  def_kernel("smoke", "add_scalar_f32", &sharnn::add_scalar_f32, py::arg("out"), py::arg("in"),
             py::arg("n"), py::arg("value"), py::arg("stream"),
             "out[i] = in[i] + value on the cudaStream_t `stream` (raw pointers as ints)");

  // Per-op launchers are bound here, one block per op folder, each with def_kernel:
  //   csrc/lstm/       def_kernel("lstm", "lstm_fwd_f32", ...)
  //   csrc/attention/  def_kernel("attention", ...)
  //   csrc/boom/       def_kernel("boom", ...)
#endif

  m.def(
      "build_info",
      [kernels]() {
        py::dict info;
#ifdef SHARNN_WITH_CUDA
        info["cuda"] = true;
#else
        info["cuda"] = false;
#endif
        info["cuda_compiler_version"] = SHARNN_CUDA_COMPILER_VERSION;
        info["cuda_archs"] = split_commas(SHARNN_CUDA_ARCHS);
        info["cuda_reason"] = SHARNN_CUDA_REASON;
        info["kernels"] = kernels;
        info["compiler"] = SHARNN_CXX_COMPILER;
        return info;
      },
      "What this build compiled: CUDA or not (and why not), nvcc version, archs, kernels, "
      "compiler");
}
