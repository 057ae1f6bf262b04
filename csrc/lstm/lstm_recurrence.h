// Launchers of the persistent LSTM recurrence kernels (forward and backward). Plain C++ types only,
// so that bindings.cpp needs no CUDA headers. Python (sharnn_fast/ops/lstm/cuda.py) plans the
// launch (hidden units per block, chunk of the shared vector, split of the dot products), allocates
// every tensor with torch and passes contiguous data pointers and torch's current stream.
#pragma once

#include <cstdint>
#include <string>
#include <tuple>

namespace sharnn {

// What the planner needs to know about CUDA device `device`: (multiprocessors, shared memory per
// block with opt-in, shared memory per multiprocessor, 32-bit registers per multiprocessor, whether
// cooperative launches are supported). Throws on a CUDA error (e.g. no such device).
std::tuple<int, int, int, int, bool> lstm_recurrence_device_limits(int device);

// Threads per block of both kernels (a multiple of 32); the planner divides work by it.
int lstm_recurrence_threads();

// Dynamic shared memory one block needs: the Python planner computes the same number, and a test
// checks that the two agree. `backward` selects the kernel (its rows are W_hh^T columns).
std::int64_t lstm_recurrence_shared_bytes(bool backward, std::int64_t B, std::int64_t H,
                                          std::int64_t element_bytes, std::int64_t hidden_per_block,
                                          std::int64_t chunk, std::int64_t k_splits);

// Forward recurrence of one layer, gate order i, f, g, o (nn.LSTM layout). `dtype` is "float32",
// "float16" or "bfloat16", the type of xg, w_hh, h0, c0, y and c_n; gates_saved and c_saved are
// float32 and may both be 0 (inference: nothing is saved for a backward).
//   xg [T, B, 4H]: x W_ih^T + b_ih + b_hh      w_hh [4H, H]      h0, c0 [B, H]
//   y [T, B, H] (out)   c_n [B, H] (out)   gates_saved [T, B, 4H] (out, activated gates)
//   c_saved [T, B, H] (out, cell state after each step)
void lstm_recurrence_fwd(const std::string& dtype, std::uintptr_t xg, std::uintptr_t w_hh,
                         std::uintptr_t h0, std::uintptr_t c0, std::uintptr_t y,
                         std::uintptr_t c_n, std::uintptr_t gates_saved, std::uintptr_t c_saved,
                         std::int64_t T, std::int64_t B, std::int64_t H,
                         std::int64_t hidden_per_block, std::int64_t chunk, std::int64_t k_splits,
                         std::uintptr_t stream);

// Backward recurrence: from the saved activated gates and cell states and the incoming gradients
// dy [T, B, H], dh_n, dc_n [B, H] (same dtype as w_hh), writes dgates [T, B, 4H] (gradient of the
// pre-activation gates, i.e. of xg), dh0 and dc0 [B, H]. The weight and input gradients are GEMMs
// over dgates, done by the caller.
void lstm_recurrence_bwd(const std::string& dtype, std::uintptr_t w_hh, std::uintptr_t gates_saved,
                         std::uintptr_t c_saved, std::uintptr_t c0, std::uintptr_t dy,
                         std::uintptr_t dh_n, std::uintptr_t dc_n, std::uintptr_t dgates,
                         std::uintptr_t dh0, std::uintptr_t dc0, std::int64_t T, std::int64_t B,
                         std::int64_t H, std::int64_t hidden_per_block, std::int64_t chunk,
                         std::int64_t k_splits, std::uintptr_t stream);

}  // namespace sharnn
