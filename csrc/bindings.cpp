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
#include "lstm/lstm_recurrence.h"
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

  // Per-op launchers are bound here, one block per op folder csrc/<op>/ (so far only csrc/lstm/),
  // each kernel with def_kernel(op, name, ...), which also lists it in build_info().
  def_kernel("lstm", "lstm_recurrence_fwd", &sharnn::lstm_recurrence_fwd, py::arg("dtype"),
             py::arg("xg"), py::arg("w_hh"), py::arg("h0"), py::arg("c0"), py::arg("y"),
             py::arg("c_n"), py::arg("gates_saved"), py::arg("c_saved"), py::arg("T"),
             py::arg("B"), py::arg("H"), py::arg("hidden_per_block"), py::arg("chunk"),
             py::arg("k_splits"), py::arg("stream"),
             "Persistent LSTM forward recurrence (cooperative launch); raw pointers as ints");
  def_kernel("lstm", "lstm_recurrence_bwd", &sharnn::lstm_recurrence_bwd, py::arg("dtype"),
             py::arg("w_hh"), py::arg("gates_saved"), py::arg("c_saved"), py::arg("c0"),
             py::arg("dy"), py::arg("dh_n"), py::arg("dc_n"), py::arg("dgates"), py::arg("dh0"),
             py::arg("dc0"), py::arg("T"), py::arg("B"), py::arg("H"),
             py::arg("hidden_per_block"), py::arg("chunk"), py::arg("k_splits"),
             py::arg("stream"),
             "Persistent LSTM backward recurrence (cooperative launch); raw pointers as ints");
  m.def("lstm_recurrence_device_limits", &sharnn::lstm_recurrence_device_limits,
        py::arg("device"),
        "(SMs, shared bytes per block (opt-in), shared bytes per SM, registers per SM, "
        "cooperative launch) of a CUDA device, for planning the LSTM recurrence launch");
  m.def("lstm_recurrence_threads", &sharnn::lstm_recurrence_threads,
        "Threads per block of the LSTM recurrence kernels");
  m.def("lstm_recurrence_shared_bytes", &sharnn::lstm_recurrence_shared_bytes,
        py::arg("backward"), py::arg("B"), py::arg("H"), py::arg("element_bytes"),
        py::arg("hidden_per_block"), py::arg("chunk"), py::arg("k_splits"),
        "Dynamic shared memory per block of the LSTM recurrence kernels (host arithmetic only)");
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
