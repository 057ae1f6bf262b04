// Building blocks of the persistent LSTM recurrence kernels (lstm_recurrence.cu): element types,
// the shared-memory layout (also used by the host to size the launch) and the block-wide
// matrix-vector product that each step runs against the rows a block keeps on chip.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace sharnn {
namespace lstm {

// Tuning constants of both kernels, in one place.
constexpr int kThreads = 512;  // 16 warps; one block per SM, so registers allow up to 128 each
constexpr int kWarps = kThreads / 32;
// float32 (CUDA cores): a warp task computes a tile of kFmaRows rows x kFmaBatch sequences, lanes
// splitting K; kFmaRows * kFmaBatch == 32, so after the cross-lane reduction each lane holds one
// result of the tile.
constexpr int kFmaRows = 4;
constexpr int kFmaBatch = 8;
static_assert(kFmaRows * kFmaBatch == 32, "one reduced result per lane");
// float16 / bfloat16 (tensor cores, sm_80+): a warp task is one mma.m16n8k16 tile, 16 rows x 8
// sequences, stepping K by 16.
constexpr int kMmaRows = 16;
constexpr int kMmaBatch = 8;
constexpr int kMmaK = 16;
// Rows of K elements are zero-padded to a multiple of kStripe (what a warp covers per iteration on
// the float32 path: 2 elements per lane), so neither inner loop needs bounds checks, and every row
// is kRowPad elements longer than that, which spreads the 8 rows one mma fragment reads over all
// 32 shared-memory banks.
constexpr int kStripe = 64;
constexpr int kRowPad = 8;
// Each thread updates the cell of at most kPairSlots (hidden unit, sequence) pairs, kept in
// registers: a block handles hidden_per_block x B <= kThreads * kPairSlots pairs.
constexpr int kPairSlots = 2;

__host__ __device__ constexpr std::int64_t round_up(std::int64_t value, std::int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Where each array lives in a block's dynamic shared memory. Every region starts on 16 bytes.
//   w      [rows][w_stride]  element: the block's rows of W_hh (forward) or W_hh^T (backward)
//   v      [B][v_stride]     element: one chunk of the vector shared by all blocks this step
//   part   [k_splits][rows][B] float: partial dot products, one slice per split of K
struct SharedLayout {
  std::int64_t rows, k, k_padded, w_stride, v_stride;
  std::int64_t w_offset, v_offset, part_offset, bytes;

  __host__ __device__ static SharedLayout make(bool backward, std::int64_t B, std::int64_t H,
                                               std::int64_t element_bytes,
                                               std::int64_t hidden_per_block, std::int64_t chunk,
                                               std::int64_t k_splits) {
    SharedLayout s{};
    s.rows = backward ? hidden_per_block : 4 * hidden_per_block;
    s.k = backward ? 4 * H : H;
    s.k_padded = round_up(s.k, kStripe);
    s.w_stride = s.k_padded + kRowPad;
    s.v_stride = chunk + kRowPad;
    s.w_offset = 0;
    s.v_offset = s.w_offset + round_up(s.rows * s.w_stride * element_bytes, 16);
    s.part_offset = s.v_offset + round_up(B * s.v_stride * element_bytes, 16);
    s.bytes = s.part_offset + round_up(k_splits * s.rows * B * 4, 16);
    return s;
  }
};

// Element types: float, __half, __nv_bfloat16. Arithmetic is always in float. The 2-byte types
// also multiply on tensor cores: mma(c, a, b) is mma.sync.m16n8k16 with float accumulators, the
// fragments holding 2 consecutive elements per 32-bit register.
template <typename T>
struct Element;

template <>
struct Element<float> {
  static constexpr bool kTensorCores = false;
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
  __device__ static float zero() { return 0.0f; }
  __device__ static float2 load_pair(const float* p) { return *reinterpret_cast<const float2*>(p); }
};

template <>
struct Element<__half> {
  static constexpr bool kTensorCores = true;
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ static __half zero() { return __float2half_rn(0.0f); }
  __device__ static float2 load_pair(const __half* p) {
    return __half22float2(*reinterpret_cast<const __half2*>(p));
  }
  __device__ static void mma(float (&c)[4], const std::uint32_t (&a)[4],
                             const std::uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
};

template <>
struct Element<__nv_bfloat16> {
  static constexpr bool kTensorCores = true;
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ static __nv_bfloat16 zero() { return __float2bfloat16_rn(0.0f); }
  __device__ static float2 load_pair(const __nv_bfloat16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
  }
  __device__ static void mma(float (&c)[4], const std::uint32_t (&a)[4],
                             const std::uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
};

// Tensor cores where the type and the architecture have them (mma.sync with 2-byte inputs needs
// sm_80); the float32 path everywhere else.
template <typename T>
__device__ constexpr bool use_tensor_cores() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return Element<T>::kTensorCores;
#else
  return false;
#endif
}

// Two consecutive 2-byte elements as the 32-bit register an mma fragment holds.
template <typename T>
__device__ inline std::uint32_t load_b32(const T* p) {
  return *reinterpret_cast<const std::uint32_t*>(p);
}

__device__ inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// One round of warp_transpose_sum: lanes that differ in bit `Half` swap halves of their values.
// A template, so that every index into acc is a compile-time constant (acc stays in registers).
template <int Half>
__device__ inline void transpose_sum_round(float (&acc)[32], int lane) {
  const bool upper = (lane & Half) != 0;
#pragma unroll
  for (int j = 0; j < Half; ++j) {
    const float keep = upper ? acc[j + Half] : acc[j];
    const float send = upper ? acc[j] : acc[j + Half];
    acc[j] = keep + __shfl_xor_sync(0xffffffffu, send, Half);
  }
}

// Sums each of the 32 values acc[0..31] over the 32 lanes of a warp; afterwards acc[0] of lane i
// holds the sum of value i. Each round a lane keeps one half of its values and hands the other half
// to its partner, so the whole reduction takes 16 + 8 + 4 + 2 + 1 shuffles instead of 32 x 5.
__device__ inline void warp_transpose_sum(float (&acc)[32], int lane) {
  transpose_sum_round<16>(acc, lane);
  transpose_sum_round<8>(acc, lane);
  transpose_sum_round<4>(acc, lane);
  transpose_sum_round<2>(acc, lane);
  transpose_sum_round<1>(acc, lane);
}

// Writes the result of split `split` for (r, b) into part, or adds it to what the previous chunks
// left there (chunks run in order, each (split, r, b) always in the same warp).
__device__ inline void store_partial(float* part, int split, int rows, int B, int r, int b,
                                     bool first_chunk, float value) {
  if (r < rows && b < B) {
    float& out = part[(static_cast<std::int64_t>(split) * rows + r) * B + b];
    out = (first_chunk ? 0.0f : out) + value;
  }
}

// part[s][r][b] = sum over the K-split s of w_s[r][k] * v[b][k], for r < rows, b < B.
//
// w_s: [rows][w_stride] in shared memory, zero beyond k. v: [B][k] in global memory, written by
// other blocks before the grid barrier that precedes this call; it is read with ld.global.cg (L2,
// never a possibly stale L1 line) and staged chunk by chunk into v_s [B][v_stride], zero beyond k.
// Work: output tiles (16 x 8 on tensor cores, 4 x 8 on CUDA cores), each split k_splits ways along
// K (interleaved steps), one warp per (tile, split) task; the splits are summed later in a fixed
// order, so results do not depend on scheduling (no atomics). Rows and sequences past the end read
// a valid row (the last) and are dropped at the write, which keeps the inner loops branch-free.
// Ends with __syncthreads(), so part is complete when it returns.
template <typename T>
__device__ void block_matvec(const T* __restrict__ w_s, const SharedLayout& s, int B,
                             const T* __restrict__ v, T* __restrict__ v_s, int chunk, int k_splits,
                             float* __restrict__ part) {
  using E = Element<T>;
  constexpr bool kMma = use_tensor_cores<T>();
  constexpr int kTileRows = kMma ? kMmaRows : kFmaRows;
  constexpr int kTileBatch = kMma ? kMmaBatch : kFmaBatch;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int rows = static_cast<int>(s.rows);
  const int k = static_cast<int>(s.k);
  const int k_padded = static_cast<int>(s.k_padded);
  const int w_stride = static_cast<int>(s.w_stride);
  const int v_stride = static_cast<int>(s.v_stride);
  const int batch_tiles = (B + kTileBatch - 1) / kTileBatch;
  const int tiles = (rows + kTileRows - 1) / kTileRows * batch_tiles;
  const int tasks = tiles * k_splits;

  // 16-byte loads where every row of v starts on 16 bytes (k0, chunk and v_stride keep the
  // shared side aligned); element by element otherwise. The same for the whole block.
  constexpr int kVector = 16 / sizeof(T);
  const bool vectorized = k % kVector == 0 && reinterpret_cast<std::uintptr_t>(v) % 16 == 0;

  for (int k0 = 0; k0 < k_padded; k0 += chunk) {
    const int len = min(chunk, k_padded - k0);  // a multiple of kStripe, so of kVector
    if (vectorized) {
      const int vectors = len / kVector;
      for (int i = threadIdx.x; i < B * vectors; i += kThreads) {
        const int b = i / vectors;
        const int kk = (i - b * vectors) * kVector;
        const int col = k0 + kk;  // col < k implies col + kVector <= k, as k % kVector == 0
        *reinterpret_cast<uint4*>(v_s + static_cast<std::int64_t>(b) * v_stride + kk) =
            col < k ? __ldcg(reinterpret_cast<const uint4*>(v + static_cast<std::int64_t>(b) * k +
                                                             col))
                    : make_uint4(0, 0, 0, 0);  // all-zero bits are 0.0 in every element type
      }
    } else {
      for (int i = threadIdx.x; i < B * len; i += kThreads) {
        const int b = i / len;
        const int kk = i - b * len;
        const int col = k0 + kk;
        v_s[static_cast<std::int64_t>(b) * v_stride + kk] =
            col < k ? __ldcg(v + static_cast<std::int64_t>(b) * k + col) : E::zero();
      }
    }
    __syncthreads();

    // Task loops are warp-uniform (task depends only on the warp), as mma.sync and the shuffles
    // below need every lane.
    for (int task = warp; task < tasks; task += kWarps) {
      const int tile = task % tiles;
      const int split = task / tiles;
      const int r0 = tile / batch_tiles * kTileRows;
      const int b0 = tile % batch_tiles * kTileBatch;
      if constexpr (kMma) {
        // Fragments of mma.m16n8k16 (PTX ISA): with g = lane / 4 and q = lane % 4, registers
        // a0..a3 hold A[g][2q..], A[g+8][2q..], A[g][2q+8..], A[g+8][2q+8..]; b0, b1 hold
        // B[2q..][g], B[2q+8..][g] (B = v^T, so v_s[g][2q..]); c0, c1 = C[g][2q, 2q+1] and
        // c2, c3 = C[g+8][2q, 2q+1].
        const int g = lane / 4, q = lane % 4;
        const T* a_top =
            w_s + static_cast<std::int64_t>(min(r0 + g, rows - 1)) * w_stride + k0 + 2 * q;
        const T* a_bottom =
            w_s + static_cast<std::int64_t>(min(r0 + g + 8, rows - 1)) * w_stride + k0 + 2 * q;
        const T* b_col = v_s + static_cast<std::int64_t>(min(b0 + g, B - 1)) * v_stride + 2 * q;
        float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int kk = split * kMmaK; kk < len; kk += kMmaK * k_splits) {
          const std::uint32_t a[4] = {load_b32(a_top + kk), load_b32(a_bottom + kk),
                                      load_b32(a_top + kk + 8), load_b32(a_bottom + kk + 8)};
          const std::uint32_t b[2] = {load_b32(b_col + kk), load_b32(b_col + kk + 8)};
          E::mma(c, a, b);
        }
        store_partial(part, split, rows, B, r0 + g, b0 + 2 * q, k0 == 0, c[0]);
        store_partial(part, split, rows, B, r0 + g, b0 + 2 * q + 1, k0 == 0, c[1]);
        store_partial(part, split, rows, B, r0 + g + 8, b0 + 2 * q, k0 == 0, c[2]);
        store_partial(part, split, rows, B, r0 + g + 8, b0 + 2 * q + 1, k0 == 0, c[3]);
      } else {
        const T* w_rows[kTileRows];
        const T* v_rows[kTileBatch];
#pragma unroll
        for (int rr = 0; rr < kTileRows; ++rr) {
          w_rows[rr] = w_s + static_cast<std::int64_t>(min(r0 + rr, rows - 1)) * w_stride + k0;
        }
#pragma unroll
        for (int bb = 0; bb < kTileBatch; ++bb) {
          v_rows[bb] = v_s + static_cast<std::int64_t>(min(b0 + bb, B - 1)) * v_stride;
        }
        float acc[32];
#pragma unroll
        for (int i = 0; i < 32; ++i) acc[i] = 0.0f;
        for (int kk = split * kStripe + 2 * lane; kk < len; kk += kStripe * k_splits) {
          float2 w[kTileRows];
#pragma unroll
          for (int rr = 0; rr < kTileRows; ++rr) w[rr] = E::load_pair(w_rows[rr] + kk);
#pragma unroll
          for (int bb = 0; bb < kTileBatch; ++bb) {
            const float2 x = E::load_pair(v_rows[bb] + kk);
#pragma unroll
            for (int rr = 0; rr < kTileRows; ++rr) {
              acc[rr * kTileBatch + bb] =
                  fmaf(w[rr].y, x.y, fmaf(w[rr].x, x.x, acc[rr * kTileBatch + bb]));
            }
          }
        }
        warp_transpose_sum(acc, lane);
        store_partial(part, split, rows, B, r0 + lane / kTileBatch, b0 + lane % kTileBatch,
                      k0 == 0, acc[0]);
      }
    }
    __syncthreads();  // v_s is restaged next chunk; part is read after the last one
  }
}

// Sum of the k_splits partial results of (row, b), in a fixed order.
__device__ inline float sum_splits(const float* part, int k_splits, int rows, int B, int row,
                                   int b) {
  float total = 0.0f;
  for (int split = 0; split < k_splits; ++split) {
    total += part[(static_cast<std::int64_t>(split) * rows + row) * B + b];
  }
  return total;
}

}  // namespace lstm
}  // namespace sharnn
