"""Boom in Triton: the F-wide activation never reaches device memory, in forward or in backward's
saved state.

Forward, one kernel (``boom_fwd_kernel``): a program owns BLOCK_M tokens x BLOCK_N of the d output
columns n. For each chunk c it runs the GEMM for the weight rows c*d + n (K = d) into an fp32
accumulator, adds the bias, applies GELU(z) = z * sigmoid(1.702 z) and dropout in registers, and adds
the result to a running fp32 sum; only that d-wide sum is written.

Backward saves nothing but the inputs and a one-element seed. ``boom_bwd_dz_kernel`` recomputes
z = x W^T + b tile by tile over [N, F] (a tile inside one chunk, like the forward's), regenerates
the dropout mask and writes dz = dy[:, f mod d] * keep * scale * GELU'(z) once (input dtype, fp32
math) plus per-block column sums for db; then dX = dz W and dW = dz^T x are two cuBLAS GEMMs. Recomputing z costs one GEMM of the
forward's size but keeps no [N, F] tensor alive between forward and backward (the torch backend keeps
z, and with dropout a mask of the same shape).

Dropout: keep element (m, f = c*d + n) of the virtual [N, F] activation iff the top 24 bits of
output n % 4 of Philox(seed, counter = (n // 4, m, c, 0)) are >= round(p * 2**24): all four
outputs of each Philox call are used, and the mask depends on (seed, m, f) only, not on the tiles.
The seed is a one-element int64 tensor drawn from torch's generator on the input's device, so
torch.manual_seed makes masks reproducible, torch.compile sees an ordinary random op, and backward regenerates the same mask from
the seed it saved. Three counter words (column group, row, chunk) instead of one flat offset: no
overflow for any N.

Both directions are ``torch.library.triton_op``s with ``register_autograd``, so
torch.compile(fullgraph=True) traces them; under autocast the inputs are cast to the autocast dtype
before the op (the op itself is dtype-agnostic: fp32, fp16, bf16 in, fp32 accumulation).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...backend import Implementation
from .._kernels import compute_dtype, interpreted, new_output, triton_why_not
from .._precision import triton_dot_precision

# Globals a kernel reads must be constexpr (compiled Triton rejects plain globals).
_GELU_SCALE = tl.constexpr(1.702)
_MASK_BITS = tl.constexpr(24)  # random bits compared with the dropout threshold: keep rate exact to 2**-24

# Tuning constants, the only place they live: per kernel, BLOCK_M tokens x BLOCK_N columns, K in
# steps of BLOCK_K, and the launch options. GPU values checked with tools/compile_report.py (sm_90a
# and sm_80, no GPU needed; not yet timed on a GPU): none of them spills. The forward in 16-bit
# takes a 128 x 128 tile; float32 (tf32x3 dots: every operand split in two) and the dz kernel
# (which keeps z, its sigmoid, dy and the dropout bits live per element) spill at that size, so
# they take half the columns. BLOCK_K keeps the 3-stage operand buffers within 96 KB (sm_80 has
# 164 KB). BLOCK_N must be a multiple of 4 (four dropout elements per Philox call). No autotune:
# every config costs seconds of compilation per shape and dtype. Under the interpreter: tiles
# smaller than the test widths (80, 320), so the masks on every edge (tokens, columns, K) are
# exercised.
GPU_CONFIG = dict(
    fwd=dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dz=dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
)
GPU_CONFIG_FP32 = dict(
    fwd=dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
    dz=dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
)
INTERPRETER_CONFIG = dict(fwd=dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32),
                          dz=dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32))


def launch_config(kernel: str, dtype: torch.dtype, interpreter: bool) -> dict:
    """Block sizes and launch options of ``kernel`` ("fwd" or "dz") for inputs of ``dtype``, on a
    GPU or (``interpreter``) in Triton's interpreter. The launchers take them from here only, so
    tools/compile_report.py, which runs the launchers on meta tensors, compiles what runs."""
    if interpreter:
        table = INTERPRETER_CONFIG
    else:
        table = GPU_CONFIG_FP32 if dtype == torch.float32 else GPU_CONFIG
    return dict(table[kernel])


@triton.jit
def _operand_tiles(x_ptr, w_ptr, offs_m, rows, k, N, D, F, stride_xm, stride_xk, stride_wf, stride_wk):
    """x[offs_m, k] [BLOCK_M, BLOCK_K] and W[rows, k]^T [BLOCK_K, BLOCK_N], zero outside the tensors."""
    k_ok = k < D
    x_tile = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                     mask=(offs_m < N)[:, None] & k_ok[None, :], other=0.0)
    w_tile = tl.load(w_ptr + rows[None, :] * stride_wf + k[:, None] * stride_wk,
                     mask=(rows < F)[None, :] & k_ok[:, None], other=0.0)
    return x_tile, w_tile


@triton.jit
def _add_bias(acc, b_ptr, rows, F, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=rows < F, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _dropout_bits(seed, offs_m, chunk, n_start, BLOCK_N: tl.constexpr):
    """24 uniform random bits (as int32) for each element of the [len(offs_m), BLOCK_N] tile at
    tokens offs_m and columns n_start .. n_start + BLOCK_N - 1 of chunk ``chunk``; the element is
    kept iff they are >= the threshold. Element (m, c, n) takes output n % 4 of
    Philox(seed, counter = (n // 4, m, c, 0)): one call serves four elements, and the bits are a
    function of (seed, m, c, n) only, so every tiling draws the same mask (n_start must be a
    multiple of 4, which every BLOCK_N makes it)."""
    zero = tl.zeros((offs_m.shape[0], BLOCK_N // 4), dtype=tl.int32)
    groups = n_start // 4 + tl.arange(0, BLOCK_N // 4)
    r0, r1, r2, r3 = tl.philox(seed, groups[None, :] + zero, offs_m[:, None] + zero, chunk + zero, zero)
    # join(join(r0, r2), join(r1, r3))[m, j, a, b] is output 2a + b of group j: column 4j + 2a + b.
    bits = tl.join(tl.join(r0, r2), tl.join(r1, r3)).reshape(offs_m.shape[0], BLOCK_N)
    return (bits >> (32 - _MASK_BITS)).to(tl.int32)


@triton.jit
def boom_fwd_kernel(x_ptr, w_ptr, b_ptr, seed_ptr, y_ptr, N, D, F,
                    stride_xm, stride_xk, stride_wf, stride_wk, stride_ym,
                    drop_threshold, keep_scale,
                    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[m, n] = sum over chunks c of dropout(GELU(z[m, c*D + n])); grid (N / BLOCK_M, D / BLOCK_N)."""
    # Under torch.compile, Inductor passes Python floats as fp64, which would promote the math (and
    # break tl.dot's fp32 accumulator): compute with them in fp32 whatever the launcher passes.
    keep_scale = tl.cast(keep_scale, tl.float32)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_start = tl.program_id(1) * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    # Columns n >= D of the last column block read rows of the next chunk (or rows past F, which
    # load as zero): harmless, as they are never stored.
    n_ok = offs_n < D
    if DROPOUT:
        seed = tl.load(seed_ptr)
    offs_k = tl.arange(0, BLOCK_K)
    k_tiles = tl.cdiv(D, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat loop over (chunk, K tile) with the chunk's epilogue under a condition, rather than a
    # chunk loop around a K loop: the loads stay software-pipelined across chunk boundaries.
    for i in range(0, (F // D) * k_tiles):
        c = i // k_tiles
        k_tile = i - c * k_tiles
        rows = c * D + offs_n
        x_tile, w_tile = _operand_tiles(x_ptr, w_ptr, offs_m, rows, k_tile * BLOCK_K + offs_k, N, D, F,
                                        stride_xm, stride_xk, stride_wf, stride_wk)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=DOT_PRECISION)
        if k_tile == k_tiles - 1:
            z = _add_bias(acc, b_ptr, rows, F, HAS_BIAS)
            a = z * tl.sigmoid(z * _GELU_SCALE)
            if DROPOUT:
                keep = _dropout_bits(seed, offs_m, c, n_start, BLOCK_N) >= drop_threshold
                a = tl.where(keep, a * keep_scale, 0.0)
            y += a
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
             y.to(y_ptr.dtype.element_ty), mask=(offs_m < N)[:, None] & n_ok[None, :])


@triton.jit
def boom_bwd_dz_kernel(x_ptr, w_ptr, b_ptr, seed_ptr, dy_ptr, dz_ptr, db_partial_ptr, N, D, F,
                       stride_xm, stride_xk, stride_wf, stride_wk, stride_dym, stride_dyn,
                       drop_threshold, keep_scale,
                       HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dz[m, c*D + n] = dy[m, n] * keep * scale * GELU'(z[m, c*D + n]) with z recomputed, and
    db_partial[block of m, f] = sum over the block's tokens of dz; grid (N / BLOCK_M,
    F / D * D / BLOCK_N): a tile stays inside one chunk c, as in the forward."""
    # Under torch.compile, Inductor passes Python floats as fp64, which would promote the math (and
    # break tl.dot's fp32 accumulator): compute with them in fp32 whatever the launcher passes.
    keep_scale = tl.cast(keep_scale, tl.float32)
    pid_m = tl.program_id(0)
    n_blocks = tl.cdiv(D, BLOCK_N)
    c = tl.program_id(1) // n_blocks
    n_start = (tl.program_id(1) - c * n_blocks) * BLOCK_N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_f = c * D + offs_n
    m_ok = offs_m < N
    n_ok = offs_n < D
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Columns n >= D read rows of the next chunk (or past F, loaded as zero): never stored.
    for k0 in range(0, D, BLOCK_K):
        x_tile, w_tile = _operand_tiles(x_ptr, w_ptr, offs_m, offs_f, k0 + offs_k, N, D, F,
                                        stride_xm, stride_xk, stride_wf, stride_wk)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=DOT_PRECISION)
    z = _add_bias(acc, b_ptr, offs_f, F, HAS_BIAS)
    s = tl.sigmoid(z * _GELU_SCALE)
    # d/dz [z s(1.702 z)] = s + 1.702 z s (1 - s)
    gelu_grad = s * (1.0 + z * _GELU_SCALE * (1.0 - s))
    tile_ok = m_ok[:, None] & n_ok[None, :]
    # Every chunk of the activation receives the upstream gradient of its column n;
    # rows past N load 0 so they add nothing to db.
    dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                 mask=tile_ok, other=0.0).to(tl.float32)
    dz = dy * gelu_grad
    if DROPOUT:
        seed = tl.load(seed_ptr)
        keep = _dropout_bits(seed, offs_m, c, n_start, BLOCK_N) >= drop_threshold
        dz = tl.where(keep, dz * keep_scale, 0.0)
    tl.store(dz_ptr + offs_m[:, None] * F + offs_f[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=tile_ok)
    tl.store(db_partial_ptr + pid_m * F + offs_f, tl.sum(dz, axis=0), mask=n_ok)


def _dropout_constants(dropout_p: float):
    """(threshold on the 24-bit uniform, scale of the kept elements) for dropout probability p."""
    threshold = round(dropout_p * 2**_MASK_BITS.value)
    scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
    return threshold, scale


def _check_chunks(x, weight):
    d, F = x.shape[-1], weight.shape[0]
    if F == 0 or F % d != 0:
        raise ValueError(f"weight must have a positive multiple of d={d} rows, got {F}: "
                         "Boom sums the F // d chunks of width d")


@torch.library.triton_op("sharnn_fast::boom_fwd", mutates_args=())
def boom_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             seed: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
    """x [N, d], weight [F, d], bias [F] or None, seed [1] int64 (None: no dropout) -> y [N, d]."""
    _check_chunks(x, weight)
    N, D = x.shape
    F = weight.shape[0]
    y = new_output((N, D), x.dtype, x.device)  # [N, d]
    threshold, scale = _dropout_constants(dropout_p)

    config = launch_config("fwd", x.dtype, interpreted(boom_fwd_kernel))
    grid = (triton.cdiv(N, config["BLOCK_M"]), triton.cdiv(D, config["BLOCK_N"]))
    torch.library.wrap_triton(boom_fwd_kernel)[grid](
        x, weight, weight if bias is None else bias, x if seed is None else seed, y, N, D, F,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0),
        threshold, scale, HAS_BIAS=bias is not None, DROPOUT=seed is not None,
        DOT_PRECISION=triton_dot_precision(x.dtype), **config)
    return y


@torch.library.triton_op("sharnn_fast::boom_bwd", mutates_args=())
def boom_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             seed: Optional[torch.Tensor], dropout_p: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy [N, d] and boom_fwd's inputs -> (dx [N, d], dweight [F, d], dbias [F]); dbias is the
    gradient of a zero bias when bias is None."""
    N, D = x.shape
    F = weight.shape[0]
    dz = new_output((N, F), x.dtype, x.device)  # [N, F]: transient, freed when backward returns
    threshold, scale = _dropout_constants(dropout_p)

    config = launch_config("dz", x.dtype, interpreted(boom_bwd_dz_kernel))
    token_blocks = triton.cdiv(N, config["BLOCK_M"])
    # db from fp32 column sums of dz before it is rounded to the input dtype, one row per token block.
    db_partial = new_output((token_blocks, F), torch.float32, x.device)  # [N / BLOCK_M, F]
    grid = (token_blocks, F // D * triton.cdiv(D, config["BLOCK_N"]))
    torch.library.wrap_triton(boom_bwd_dz_kernel)[grid](
        x, weight, weight if bias is None else bias, x if seed is None else seed, dy, dz, db_partial,
        N, D, F, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        dy.stride(0), dy.stride(1), threshold, scale,
        HAS_BIAS=bias is not None, DROPOUT=seed is not None, DOT_PRECISION=triton_dot_precision(x.dtype),
        **config)
    dx = torch.matmul(dz, weight)  # [N, d]
    dweight = torch.matmul(dz.t(), x)  # [F, d]
    dbias = db_partial.sum(0).to(weight.dtype if bias is None else bias.dtype)  # [F]
    return dx, dweight, dbias


def _setup_context(ctx, inputs, output):
    x, weight, bias, seed, dropout_p = inputs
    ctx.save_for_backward(x, weight, bias, seed)
    ctx.dropout_p = dropout_p


def _backward(ctx, dy):
    x, weight, bias, seed = ctx.saved_tensors
    dx, dweight, dbias = boom_bwd(dy, x, weight, bias, seed, ctx.dropout_p)
    return dx, dweight, None if bias is None else dbias, None, None


boom_fwd.register_autograd(_backward, setup_context=_setup_context)

def boom_triton(x, weight, bias, dropout_p=0.0, training=False):
    """x [..., d], weight [F, d], bias [F] or None -> y [..., d]."""
    dtype = compute_dtype(x)
    x, weight = x.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    dropout_p = dropout_p if training else 0.0
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)  # [1]
    y = boom_fwd(x.reshape(-1, x.shape[-1]), weight, bias, seed, dropout_p)  # [N, d]
    return y.view(x.shape)


def boom_triton_why_not(x, weight, bias, dropout_p=0.0, training=False) -> Optional[str]:
    reason = triton_why_not("Boom", x, boom_fwd_kernel)
    if reason is not None:
        return reason
    device, dtype = x.device, compute_dtype(x)
    tokens, F = x.numel() // x.shape[-1], weight.shape[0]
    if tokens * F >= 2**31:
        return (f"{tokens} tokens x F={F} exceeds the 2**31 elements the kernels index with int32; "
                "split the tokens into several calls or use backend='torch'")
    if (device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_properties(device).major < 8):  # constant-folded by torch.compile
        return ("bfloat16 tensor-core dots need a GPU of compute capability 8.0 or newer; use float16 "
                "or backend='torch'")
    return None


IMPLEMENTATION = Implementation(run=boom_triton, why_not=boom_triton_why_not)
