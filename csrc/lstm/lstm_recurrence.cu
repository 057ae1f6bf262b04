// Persistent LSTM recurrence (issue 5): one cooperative launch runs all T steps of one layer.
//
// Block j owns hidden units [j * hb, j * hb + units) (units = hb except in the last block) and all
// four gates of them. It loads its rows of W_hh into shared memory once, then every step:
//   forward:  gates = xg[t] + W_rows h_{t-1}; c, h update; h_t -> y[t]
//   backward: dh_t = dy[t] + (W_hh^T)_rows dgates_{t+1}; dc, dgates_t -> dgates[t]
// The vector every block needs (h_{t-1}, resp. dgates_{t+1}) is the previous step's output, written
// by all blocks to global memory; one grid barrier per step (cooperative_groups grid.sync(), whose
// release/acquire orders those writes before the reads that follow) separates producing it from
// consuming it. The product runs on tensor cores for float16/bfloat16 and on CUDA cores for
// float32, always accumulating in float32; the cell state (c, and the carried dc) stays in
// registers in float32 for the whole sequence. Whatever a step reads that does not depend on the
// recurrence (xg; dy and the saved gates and cells) is loaded one step ahead.
//
// All tensors are contiguous and allocated by torch; pointers arrive as integers.
#include <cooperative_groups.h>

#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>

#include "common/cuda_check.cuh"
#include "lstm/lstm_recurrence.cuh"
#include "lstm/lstm_recurrence.h"

namespace cg = cooperative_groups;

namespace sharnn {
namespace lstm {
namespace {

struct ForwardParams {
  const void* xg;       // [T, B, 4H]
  const void* w_hh;     // [4H, H]
  const void* h0;       // [B, H]
  const void* c0;       // [B, H]
  void* y;              // [T, B, H]
  void* c_n;            // [B, H]
  float* gates_saved;   // [T, B, 4H] activated gates, or null
  float* c_saved;       // [T, B, H], or null
  int T, B, H, hb, chunk, k_splits;
};

struct BackwardParams {
  const void* w_hh;          // [4H, H]
  const float* gates_saved;  // [T, B, 4H]
  const float* c_saved;      // [T, B, H]
  const void* c0;            // [B, H]
  const void* dy;            // [T, B, H]
  const void* dh_n;          // [B, H]
  const void* dc_n;          // [B, H]
  void* dgates;              // [T, B, 4H]
  void* dh0;                 // [B, H]
  void* dc0;                 // [B, H]
  int T, B, H, hb, chunk, k_splits;
};

// The (unit, sequence) pairs of the cell update: thread x handles pair x + j * kThreads in slot j,
// the same pairs at every step, so the cell state (c forward, the carried dc backward) stays in
// that thread's registers for the whole sequence and needs no synchronisation.
struct Pair {
  bool valid;
  int u, b;
  std::int64_t unit_offset;  // b * H + unit0 + u: the pair's element in a [B, H] tensor
};

__device__ inline Pair pair_of(int slot, int hb, int units, int B, int H, int unit0) {
  const int i = threadIdx.x + slot * kThreads;
  Pair pair{};
  pair.u = i % hb;
  pair.b = i / hb;
  pair.valid = i < hb * B && pair.u < units;
  pair.unit_offset = pair.b * static_cast<std::int64_t>(H) + unit0 + pair.u;
  return pair;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) lstm_fwd_kernel(ForwardParams p) {
  using E = Element<T>;
  extern __shared__ __align__(16) unsigned char shared[];
  const cg::grid_group grid = cg::this_grid();
  const SharedLayout s = SharedLayout::make(false, p.B, p.H, sizeof(T), p.hb, p.chunk, p.k_splits);
  T* w_s = reinterpret_cast<T*>(shared + s.w_offset);
  T* v_s = reinterpret_cast<T*>(shared + s.v_offset);
  float* part = reinterpret_cast<float*>(shared + s.part_offset);

  const int H = p.H, B = p.B, hb = p.hb;
  const std::int64_t H4 = 4 * static_cast<std::int64_t>(H);
  const std::int64_t BH = static_cast<std::int64_t>(B) * H;
  const int rows = static_cast<int>(s.rows);
  const int k_padded = static_cast<int>(s.k_padded);
  const int unit0 = blockIdx.x * hb;
  const int units = min(hb, H - unit0);
  const T* w_hh = static_cast<const T*>(p.w_hh);
  const T* xg = static_cast<const T*>(p.xg);
  T* y = static_cast<T*>(p.y);

  // Local row gate * hb + u holds W_hh row gate * H + unit0 + u; rows of units past the end and
  // columns past H are zero.
  const std::int64_t w_elements = static_cast<std::int64_t>(rows) * k_padded;
  for (std::int64_t i = threadIdx.x; i < w_elements; i += kThreads) {
    const int r = static_cast<int>(i / k_padded);
    const int col = static_cast<int>(i % k_padded);
    const int gate = r / hb, u = r % hb;
    w_s[r * s.w_stride + col] =
        (u < units && col < H) ? w_hh[(gate * static_cast<std::int64_t>(H) + unit0 + u) * H + col]
                               : E::zero();
  }
  // block_matvec's first __syncthreads() orders the w_s stores above before any read of them.

  Pair pairs[kPairSlots];
  float c[kPairSlots];
  // xg of the next step, loaded a step ahead: xg does not depend on the recurrence, so its loads
  // are in flight during the grid barrier and the product instead of after them. Kept as T, so
  // that nothing waits for them before the cell update uses them.
  T xg_next[kPairSlots][4];
#pragma unroll
  for (int j = 0; j < kPairSlots; ++j) {
    pairs[j] = pair_of(j, hb, units, B, H, unit0);
    if (!pairs[j].valid) continue;
    c[j] = E::to_float(static_cast<const T*>(p.c0)[pairs[j].unit_offset]);
#pragma unroll
    for (int gate = 0; gate < 4; ++gate) {
      xg_next[j][gate] = xg[pairs[j].b * H4 + gate * static_cast<std::int64_t>(H) + unit0 +
                            pairs[j].u];
    }
  }

  for (int t = 0; t < p.T; ++t) {
    if (t > 0) grid.sync();  // y[t - 1] is complete in every block
    const T* h_prev = t == 0 ? static_cast<const T*>(p.h0) : y + (t - 1) * BH;
    block_matvec<T>(w_s, s, B, h_prev, v_s, p.chunk, p.k_splits, part);

#pragma unroll
    for (int j = 0; j < kPairSlots; ++j) {
      const Pair& pair = pairs[j];
      if (!pair.valid) continue;
      float pre[4];
#pragma unroll
      for (int gate = 0; gate < 4; ++gate) {
        pre[gate] = sum_splits(part, p.k_splits, rows, B, gate * hb + pair.u, pair.b) +
                    E::to_float(xg_next[j][gate]);
      }
      const float in_gate = sigmoid(pre[0]);
      const float forget_gate = sigmoid(pre[1]);
      const float cell_gate = tanhf(pre[2]);
      const float out_gate = sigmoid(pre[3]);
      c[j] = forget_gate * c[j] + in_gate * cell_gate;
      const std::int64_t at = t * BH + pair.unit_offset;  // [t, b, unit] of a [T, B, H] tensor
      y[at] = E::from_float(out_gate * tanhf(c[j]));
      if (p.gates_saved != nullptr) {
        float* g =
            p.gates_saved + (static_cast<std::int64_t>(t) * B + pair.b) * H4 + unit0 + pair.u;
        g[0] = in_gate;
        g[H] = forget_gate;
        g[2 * static_cast<std::int64_t>(H)] = cell_gate;
        g[3 * static_cast<std::int64_t>(H)] = out_gate;
        p.c_saved[at] = c[j];
      }
      if (t + 1 < p.T) {
        const T* next =
            xg + (static_cast<std::int64_t>(t + 1) * B + pair.b) * H4 + unit0 + pair.u;
#pragma unroll
        for (int gate = 0; gate < 4; ++gate) {
          xg_next[j][gate] = next[gate * static_cast<std::int64_t>(H)];
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kPairSlots; ++j) {
    if (pairs[j].valid) static_cast<T*>(p.c_n)[pairs[j].unit_offset] = E::from_float(c[j]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) lstm_bwd_kernel(BackwardParams p) {
  using E = Element<T>;
  extern __shared__ __align__(16) unsigned char shared[];
  const cg::grid_group grid = cg::this_grid();
  const SharedLayout s = SharedLayout::make(true, p.B, p.H, sizeof(T), p.hb, p.chunk, p.k_splits);
  T* w_s = reinterpret_cast<T*>(shared + s.w_offset);
  T* v_s = reinterpret_cast<T*>(shared + s.v_offset);
  float* part = reinterpret_cast<float*>(shared + s.part_offset);

  const int H = p.H, B = p.B, hb = p.hb;
  const std::int64_t H4 = 4 * static_cast<std::int64_t>(H);
  const std::int64_t BH = static_cast<std::int64_t>(B) * H;
  const int rows = static_cast<int>(s.rows);
  const int k_padded = static_cast<int>(s.k_padded);
  const int unit0 = blockIdx.x * hb;
  const int units = min(hb, H - unit0);
  const T* w_hh = static_cast<const T*>(p.w_hh);
  const T* dy = static_cast<const T*>(p.dy);
  const T* c0 = static_cast<const T*>(p.c0);
  T* dgates = static_cast<T*>(p.dgates);

  // Local row u holds column unit0 + u of W_hh (a row of W_hh^T, 4H long): dh[u] = sum_k
  // W_hh[k][unit0 + u] dgates[k]. u varies fastest so that the global reads are coalesced.
  const std::int64_t w_elements = static_cast<std::int64_t>(hb) * k_padded;
  for (std::int64_t i = threadIdx.x; i < w_elements; i += kThreads) {
    const int u = static_cast<int>(i % hb);
    const std::int64_t col = i / hb;
    w_s[u * s.w_stride + col] = (u < units && col < H4) ? w_hh[col * H + unit0 + u] : E::zero();
  }
  // For T == 1 no block_matvec runs before the w_s reads after the loop; that one follows a
  // grid.sync(), which also orders the w_s stores above.

  Pair pairs[kPairSlots];
  float dc[kPairSlots];
#pragma unroll
  for (int j = 0; j < kPairSlots; ++j) {
    pairs[j] = pair_of(j, hb, units, B, H, unit0);
    if (pairs[j].valid) dc[j] = E::to_float(static_cast<const T*>(p.dc_n)[pairs[j].unit_offset]);
  }
  // What step t's cell update reads besides dh, loaded a step ahead (none of it depends on the
  // recurrence), so that the loads overlap the grid barrier and the product.
  T dy_next[kPairSlots];
  float gates_next[kPairSlots][4], c_next[kPairSlots], c_prev_next[kPairSlots];
  const auto prefetch = [&](int j, int t) {
    const std::int64_t at = t * BH + pairs[j].unit_offset;
    dy_next[j] = dy[at];
    const float* g =
        p.gates_saved + (static_cast<std::int64_t>(t) * B + pairs[j].b) * H4 + unit0 + pairs[j].u;
#pragma unroll
    for (int gate = 0; gate < 4; ++gate) {
      gates_next[j][gate] = g[gate * static_cast<std::int64_t>(H)];
    }
    c_next[j] = p.c_saved[at];
    c_prev_next[j] = t > 0 ? p.c_saved[at - BH] : E::to_float(c0[pairs[j].unit_offset]);
  };
#pragma unroll
  for (int j = 0; j < kPairSlots; ++j) {
    if (pairs[j].valid) prefetch(j, p.T - 1);
  }

  for (int t = p.T - 1; t >= 0; --t) {
    if (t < p.T - 1) {
      grid.sync();  // dgates[t + 1] is complete in every block
      block_matvec<T>(w_s, s, B, dgates + (t + 1) * static_cast<std::int64_t>(B) * H4, v_s,
                      p.chunk, p.k_splits, part);
    }
#pragma unroll
    for (int j = 0; j < kPairSlots; ++j) {
      const Pair& pair = pairs[j];
      if (!pair.valid) continue;
      const float dh_next = t == p.T - 1
                                ? E::to_float(static_cast<const T*>(p.dh_n)[pair.unit_offset])
                                : sum_splits(part, p.k_splits, rows, B, pair.u, pair.b);
      const float dh = E::to_float(dy_next[j]) + dh_next;
      const float in_gate = gates_next[j][0], forget_gate = gates_next[j][1];
      const float cell_gate = gates_next[j][2], out_gate = gates_next[j][3];
      const float c_prev = c_prev_next[j];
      const float tanh_c = tanhf(c_next[j]);
      const float dc_t = dc[j] + dh * out_gate * (1.0f - tanh_c * tanh_c);
      T* dg = dgates + (static_cast<std::int64_t>(t) * B + pair.b) * H4 + unit0 + pair.u;
      dg[0] = E::from_float(dc_t * cell_gate * in_gate * (1.0f - in_gate));
      dg[H] = E::from_float(dc_t * c_prev * forget_gate * (1.0f - forget_gate));
      dg[2 * static_cast<std::int64_t>(H)] =
          E::from_float(dc_t * in_gate * (1.0f - cell_gate * cell_gate));
      dg[3 * static_cast<std::int64_t>(H)] =
          E::from_float(dh * tanh_c * out_gate * (1.0f - out_gate));
      dc[j] = dc_t * forget_gate;
      if (t > 0) prefetch(j, t - 1);
    }
  }
  grid.sync();  // dgates[0] is complete in every block
  block_matvec<T>(w_s, s, B, dgates, v_s, p.chunk, p.k_splits, part);
#pragma unroll
  for (int j = 0; j < kPairSlots; ++j) {
    const Pair& pair = pairs[j];
    if (!pair.valid) continue;
    static_cast<T*>(p.dh0)[pair.unit_offset] =
        E::from_float(sum_splits(part, p.k_splits, rows, B, pair.u, pair.b));
    static_cast<T*>(p.dc0)[pair.unit_offset] = E::from_float(dc[j]);
  }
}

// Checks the plan the caller computed (sharnn_fast/ops/lstm/cuda.py) against what the kernel
// indexes with int, and returns the number of blocks.
int check_plan(const char* who, std::int64_t T, std::int64_t B, std::int64_t H, std::int64_t hb,
               std::int64_t chunk, std::int64_t k_splits) {
  std::ostringstream bad;
  if (T < 1 || B < 1 || H < 1) {
    bad << "T, B and H must be >= 1, got T=" << T << " B=" << B << " H=" << H;
  } else if (hb < 1 || hb > H) {
    bad << "hidden_per_block must be in [1, H=" << H << "], got " << hb;
  } else if (chunk < kStripe || chunk % kStripe != 0) {
    bad << "chunk must be a positive multiple of " << kStripe << ", got " << chunk;
  } else if (k_splits < 1 || k_splits > kWarps) {
    bad << "k_splits must be in [1, " << kWarps << "], got " << k_splits;
  } else if (hb * B > static_cast<std::int64_t>(kThreads) * kPairSlots) {
    bad << "hidden_per_block x B = " << hb * B << " exceeds the " << kThreads * kPairSlots
        << " (unit, sequence) pairs a block updates";
  } else if (T > INT32_MAX || 4 * H * B > INT32_MAX || B * chunk > INT32_MAX) {
    bad << "sizes overflow the kernel's int indices: T=" << T << " B=" << B << " H=" << H;
  }
  if (!bad.str().empty()) throw std::invalid_argument(std::string(who) + ": " + bad.str());
  return static_cast<int>((H + hb - 1) / hb);
}

void require_pointers(const char* who, std::initializer_list<std::uintptr_t> pointers) {
  for (const std::uintptr_t ptr : pointers) {
    if (ptr == 0) throw std::invalid_argument(std::string(who) + ": null data pointer");
  }
}

// A cooperative launch needs every block resident at once (grid.sync() would deadlock otherwise),
// so check the device's support, its shared memory and the occupancy before launching.
void launch_cooperative(const void* kernel, const char* name, int blocks, std::int64_t shared_bytes,
                        void* params, std::uintptr_t stream) {
  int device = 0, cooperative = 0, max_shared = 0, sms = 0, per_sm = 0;
  SHARNN_CUDA_CHECK(cudaGetDevice(&device));
  SHARNN_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  SHARNN_CUDA_CHECK(
      cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  SHARNN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  std::ostringstream bad;
  if (!cooperative) {
    bad << "device " << device << " does not support cooperative launches "
        << "(cudaDevAttrCooperativeLaunch is 0)";
  } else if (shared_bytes > max_shared) {
    bad << "needs " << shared_bytes << " bytes of shared memory per block, device " << device
        << " allows " << max_shared;
  }
  if (!bad.str().empty()) throw std::runtime_error(std::string(name) + ": " + bad.str());
  SHARNN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(shared_bytes)));
  SHARNN_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, kernel, kThreads, static_cast<std::size_t>(shared_bytes)));
  if (static_cast<std::int64_t>(per_sm) * sms < blocks) {
    std::ostringstream msg;
    msg << name << ": a cooperative launch needs all " << blocks << " blocks resident, but device "
        << device << " holds " << per_sm << " per SM x " << sms << " SMs with " << shared_bytes
        << " bytes of shared memory and " << kThreads << " threads per block";
    throw std::runtime_error(msg.str());
  }
  void* args[] = {params};
  SHARNN_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, dim3(blocks), dim3(kThreads), args,
                                                static_cast<std::size_t>(shared_bytes),
                                                reinterpret_cast<cudaStream_t>(stream)));
}

template <typename Launch>
void dispatch_dtype(const char* who, const std::string& dtype, Launch&& launch) {
  if (dtype == "float32") {
    launch(float{});
  } else if (dtype == "float16") {
    launch(__half{});
  } else if (dtype == "bfloat16") {
    launch(__nv_bfloat16{});
  } else {
    throw std::invalid_argument(std::string(who) + ": dtype must be float32, float16 or bfloat16, "
                                "got " + dtype);
  }
}

}  // namespace
}  // namespace lstm

std::tuple<int, int, int, int, bool> lstm_recurrence_device_limits(int device) {
  int sms = 0, shared_per_block = 0, shared_per_sm = 0, registers = 0, cooperative = 0;
  SHARNN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  SHARNN_CUDA_CHECK(cudaDeviceGetAttribute(&shared_per_block,
                                           cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  SHARNN_CUDA_CHECK(cudaDeviceGetAttribute(&shared_per_sm,
                                           cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  SHARNN_CUDA_CHECK(cudaDeviceGetAttribute(&registers, cudaDevAttrMaxRegistersPerMultiprocessor,
                                           device));
  SHARNN_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  return {sms, shared_per_block, shared_per_sm, registers, cooperative != 0};
}

int lstm_recurrence_threads() { return lstm::kThreads; }

std::int64_t lstm_recurrence_shared_bytes(bool backward, std::int64_t B, std::int64_t H,
                                          std::int64_t element_bytes, std::int64_t hidden_per_block,
                                          std::int64_t chunk, std::int64_t k_splits) {
  return lstm::SharedLayout::make(backward, B, H, element_bytes, hidden_per_block, chunk, k_splits)
      .bytes;
}

void lstm_recurrence_fwd(const std::string& dtype, std::uintptr_t xg, std::uintptr_t w_hh,
                         std::uintptr_t h0, std::uintptr_t c0, std::uintptr_t y,
                         std::uintptr_t c_n, std::uintptr_t gates_saved, std::uintptr_t c_saved,
                         std::int64_t T, std::int64_t B, std::int64_t H,
                         std::int64_t hidden_per_block, std::int64_t chunk, std::int64_t k_splits,
                         std::uintptr_t stream) {
  constexpr const char* who = "lstm_recurrence_fwd";
  const int blocks = lstm::check_plan(who, T, B, H, hidden_per_block, chunk, k_splits);
  lstm::require_pointers(who, {xg, w_hh, h0, c0, y, c_n});
  if ((gates_saved == 0) != (c_saved == 0)) {
    throw std::invalid_argument(std::string(who) + ": gates_saved and c_saved go together");
  }
  lstm::ForwardParams params{
      reinterpret_cast<const void*>(xg), reinterpret_cast<const void*>(w_hh),
      reinterpret_cast<const void*>(h0), reinterpret_cast<const void*>(c0),
      reinterpret_cast<void*>(y), reinterpret_cast<void*>(c_n),
      reinterpret_cast<float*>(gates_saved), reinterpret_cast<float*>(c_saved),
      static_cast<int>(T), static_cast<int>(B), static_cast<int>(H),
      static_cast<int>(hidden_per_block), static_cast<int>(chunk), static_cast<int>(k_splits)};
  lstm::dispatch_dtype(who, dtype, [&](auto element) {
    using T_ = decltype(element);
    const std::int64_t bytes = lstm_recurrence_shared_bytes(false, B, H, sizeof(T_),
                                                            hidden_per_block, chunk, k_splits);
    lstm::launch_cooperative(reinterpret_cast<const void*>(&lstm::lstm_fwd_kernel<T_>),
                             "lstm_fwd_kernel", blocks, bytes, &params, stream);
  });
}

void lstm_recurrence_bwd(const std::string& dtype, std::uintptr_t w_hh, std::uintptr_t gates_saved,
                         std::uintptr_t c_saved, std::uintptr_t c0, std::uintptr_t dy,
                         std::uintptr_t dh_n, std::uintptr_t dc_n, std::uintptr_t dgates,
                         std::uintptr_t dh0, std::uintptr_t dc0, std::int64_t T, std::int64_t B,
                         std::int64_t H, std::int64_t hidden_per_block, std::int64_t chunk,
                         std::int64_t k_splits, std::uintptr_t stream) {
  constexpr const char* who = "lstm_recurrence_bwd";
  const int blocks = lstm::check_plan(who, T, B, H, hidden_per_block, chunk, k_splits);
  lstm::require_pointers(who, {w_hh, gates_saved, c_saved, c0, dy, dh_n, dc_n, dgates, dh0, dc0});
  lstm::BackwardParams params{
      reinterpret_cast<const void*>(w_hh), reinterpret_cast<const float*>(gates_saved),
      reinterpret_cast<const float*>(c_saved), reinterpret_cast<const void*>(c0),
      reinterpret_cast<const void*>(dy), reinterpret_cast<const void*>(dh_n),
      reinterpret_cast<const void*>(dc_n), reinterpret_cast<void*>(dgates),
      reinterpret_cast<void*>(dh0), reinterpret_cast<void*>(dc0),
      static_cast<int>(T), static_cast<int>(B), static_cast<int>(H),
      static_cast<int>(hidden_per_block), static_cast<int>(chunk), static_cast<int>(k_splits)};
  lstm::dispatch_dtype(who, dtype, [&](auto element) {
    using T_ = decltype(element);
    const std::int64_t bytes = lstm_recurrence_shared_bytes(true, B, H, sizeof(T_),
                                                            hidden_per_block, chunk, k_splits);
    lstm::launch_cooperative(reinterpret_cast<const void*>(&lstm::lstm_bwd_kernel<T_>),
                             "lstm_bwd_kernel", blocks, bytes, &params, stream);
  });
}

}  // namespace sharnn
