"""The triton backend's flash-style attention kernels. ``triton.py`` sends a head here when it is
narrower than ``materialised.WIDE_HEAD_MIN_D`` (up to 256 wide, where the scores stay on chip), and
to the materialised-scores path of ``triton_wide.py`` for wider heads such as the paper's d = 1024;
see ``triton_wide.py`` for why. This kernel still runs any width when forced (``path="flash"``).

Sequence-first inputs, read through their strides (no copies): q [Tq, B, d], k [Tk, B, d],
v [Tk, B, dv]; causal mask aligned to the end (query i sees keys 0 .. Tk - Tq + i).

Why the kernels look the way they do (flash attention, adapted to a very wide head):

- The fp32 output tile for 1024 columns does not fit in registers (64 rows x 1024 columns of fp32
  is 256 KiB, the whole register file of an SM). So the output's width is split across programs:
  program = (query block, dv block, batch), and each program recomputes the scores of its query
  block: dv / BLOCK_DV times the Q.K^T work in all. The alternatives are worse: a second pass over
  the keys for the row sums still needs the scores once per dv chunk, and an accumulator in global
  memory is what makes SDPA's memory-efficient kernel slow at this width. BLOCK_DV is the largest
  width ptxas compiles without spilling (256: 2.5x the useful forward FLOPs at d = 1024; 512 would
  be 1.5x but spills), see GPU_CONFIG.
- Q.K^T (and dO.V^T in backward) are accumulated over chunks of BLOCK_DK columns of the width, so
  any d works (the last chunk masked) and only [rows, BLOCK_DK] operand tiles are live at a time.
- Key blocks entirely above the diagonal are never visited: the key loop of a query block stops at
  its last visible key. Query blocks are scheduled last-first, as the last ones have the most work.
- Softmax in base 2 (the scale folded into log2(e) / sqrt(d)); the forward saves the log-sum-exp
  (base 2) per query, [B, Tq] fp32, so backward recomputes P exactly without the Tq x Tk matrix.
- Backward: D = rowsum(dO * O) first (it equals rowsum(P * dP) with or without dropout); then a
  dK/dV kernel, program = (key block, width chunk, batch), looping over the query blocks that see the
  key block, and a dQ kernel, program = (query block, width chunk, batch), looping over its keys.
  Each writes its own output tile once: no atomics, so backward is deterministic. Like the forward,
  every chunk recomputes P and dP over the full width (the price of not holding [rows, d] fp32
  accumulators); the chunks are as wide as ptxas allows without spilling.
- Dropout on the weights: keep(b, i, j) = philox(seed, (b * Tq + i) * Tk + j) >= p
  (``triton_common.dropout_keep``), regenerated in every kernel from the seed (never stored), so it
  does not depend on block sizes or width chunks.
  The seed is a one-element int64 tensor drawn from torch's generator on the inputs' device, so
  torch.manual_seed reproduces it and torch.compile traces it. p = 0 or not training compiles the
  kernels without any dropout code (HAS_DROPOUT is a constexpr).

Registered as torch.library triton_ops ``sharnn_fast::attention_fwd`` / ``attention_bwd`` (with
register_autograd), so torch.compile(fullgraph=True) traces them. Autocast: ``triton.py``'s
``attention_triton`` casts q, k, v to the autocast dtype before calling the op, as autocast does for
matmuls.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .._kernels import interpreted, new_output
from .._precision import triton_dot_precision
from .triton_common import LOG2_E, check_lengths, dropout_keep, dropout_scale

# Tuning constants, the only place they live.
#   BLOCK_M, BLOCK_N: query and key rows per tile. BLOCK_DK: width chunk of the Q.K^T and dO.V^T
#   products. BLOCK_DV (forward) / BLOCK_C (backward): output columns per program.
# GPU values: the largest output chunks for which ptxas (sm_90a, with and without dropout) reports
# no register spills (or the fewest), compiled offline; not yet timed on a GPU. Spilled, so not used
# for 16-bit inputs: forward BLOCK_DV = 512 (8 or 16 warps), dK/dV BLOCK_C = 256 or BLOCK_M = 64,
# dQ BLOCK_N = 64. float32 (tf32x3 dots: operands split in three, tiles twice as wide in bytes)
# needs smaller tiles; its dK/dV and dQ kernels still spill a little (about 330 and 120 bytes).
# The interpreter values keep the test shapes to a few programs while still splitting every width
# into several masked chunks.
GPU_CONFIG = dict(
    fwd=dict(BLOCK_M=64, BLOCK_N=64, BLOCK_DK=64, BLOCK_DV=256, num_warps=8, num_stages=2),
    dkdv=dict(BLOCK_M=32, BLOCK_N=64, BLOCK_DK=64, BLOCK_C=128, num_warps=8, num_stages=2),
    dq=dict(BLOCK_M=64, BLOCK_N=32, BLOCK_DK=64, BLOCK_C=256, num_warps=8, num_stages=2),
    delta=dict(BLOCK_M=16, BLOCK_DK=128, num_warps=4, num_stages=1),
)
GPU_CONFIG_FP32 = dict(
    GPU_CONFIG,
    fwd=dict(BLOCK_M=64, BLOCK_N=32, BLOCK_DK=32, BLOCK_DV=128, num_warps=8, num_stages=2),
    dkdv=dict(BLOCK_M=32, BLOCK_N=64, BLOCK_DK=32, BLOCK_C=64, num_warps=8, num_stages=2),
    dq=dict(BLOCK_M=64, BLOCK_N=32, BLOCK_DK=32, BLOCK_C=128, num_warps=8, num_stages=2),
)
INTERPRETER_CONFIG = dict(
    fwd=dict(BLOCK_M=32, BLOCK_N=32, BLOCK_DK=64, BLOCK_DV=64),
    dkdv=dict(BLOCK_M=32, BLOCK_N=32, BLOCK_DK=64, BLOCK_C=64),
    dq=dict(BLOCK_M=32, BLOCK_N=32, BLOCK_DK=64, BLOCK_C=64),
    delta=dict(BLOCK_M=32, BLOCK_DK=64),
)
MIN_DOT_WIDTH = 16  # tl.dot needs every dimension >= 16


def launch_config(kernel: str, dtype: torch.dtype, interpreter: bool, **widths: int) -> dict:
    """Block sizes and launch options of ``kernel`` ("fwd", "delta", "dkdv" or "dq") for inputs of
    ``dtype``, on a GPU or (``interpreter``) in Triton's interpreter, each width block named in
    ``widths`` capped at that width rounded up to a power of two. The launchers take them from here
    only, so tools/compile_report.py, which runs the launchers on meta tensors, compiles what runs."""
    if interpreter:
        table = INTERPRETER_CONFIG
    else:
        table = GPU_CONFIG_FP32 if dtype == torch.float32 else GPU_CONFIG
    config = dict(table[kernel])
    for name, width in widths.items():
        # int(): under torch.compile a width may be symbolic; block sizes specialise on it.
        config[name] = max(MIN_DOT_WIDTH, min(config[name], triton.next_power_of_2(int(width))))
    return config


# ------------------------------------------------------------------------------------------------
# Helpers shared by the kernels
# ------------------------------------------------------------------------------------------------
# Addressing: each program adds its batch's offset (int64) to the base pointers once; offsets inside
# a batch are int32 unless a tensor spans 2**31 elements or more (WIDE_OFFSETS). 64-bit offsets for
# every element of a [64, 512] tile would cost 2 registers per element, which made ptxas spill.

@triton.jit
def _offsets(index, WIDE_OFFSETS: tl.constexpr):
    return index.to(tl.int64) if WIDE_OFFSETS else index


@triton.jit
def _dot_over_width(acc, a_ptr, a_rows, a_valid, stride_a_col, b_ptr, b_rows, b_valid, stride_b_col,
                    width, BLOCK_W: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_OFFSETS: tl.constexpr):
    """acc [R, C] + A[rows_a, :width] @ B[rows_b, :width]^T, a chunk of BLOCK_W columns at a time.

    a_rows [R] / b_rows [C] are element offsets of the rows, a_valid / b_valid their masks.
    """
    for start in range(0, width, BLOCK_W):
        cols = start + tl.arange(0, BLOCK_W)
        col_valid = cols < width
        cols = _offsets(cols, WIDE_OFFSETS)
        a = tl.load(a_ptr + a_rows[:, None] + cols[None, :] * stride_a_col,
                    mask=a_valid[:, None] & col_valid[None, :], other=0.0)  # [R, BLOCK_W]
        b_t = tl.load(b_ptr + cols[:, None] * stride_b_col + b_rows[None, :],
                      mask=col_valid[:, None] & b_valid[None, :], other=0.0)  # [BLOCK_W, C]
        acc = tl.dot(a, b_t, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _fp32(x):
    """A float argument in fp32: under torch.compile, Inductor passes Python floats as fp64, which
    would promote the math (and break tl.dot's fp32 accumulator)."""
    return tl.cast(x, tl.float32)


@triton.jit
def _program_start(q_ptr, k_ptr, v_ptr, stride_qb, stride_kb, stride_vb, seed_ptr, dropout_p, dropout_scale,
                   HAS_DROPOUT: tl.constexpr):
    """What the dK/dV and dQ kernels start with: their batch entry (program axis 2); q, k and v
    advanced to that entry; the dropout seed (0 without dropout); dropout_p and dropout_scale in
    fp32. (The forward spells the same out: through this helper ptxas gives its 16-bit dropout
    variant two more registers, 243 against 241 on sm_90a.)"""
    dropout_p, dropout_scale = _fp32(dropout_p), _fp32(dropout_scale)
    batch = tl.program_id(2)
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    return (batch, q_ptr + batch.to(tl.int64) * stride_qb, k_ptr + batch.to(tl.int64) * stride_kb,
            v_ptr + batch.to(tl.int64) * stride_vb, seed, dropout_p, dropout_scale)


@triton.jit
def _store_tile(ptr, rows, row_valid, stride_row, cols, col_valid, stride_col, value,
                WIDE_OFFSETS: tl.constexpr):
    """value [R, C] into ptr[rows, cols] (ptr: a batch entry of a [T, B, width] tensor), in ptr's
    dtype, where the row and the column are valid."""
    tile = (ptr + (_offsets(rows, WIDE_OFFSETS) * stride_row)[:, None]
            + (_offsets(cols, WIDE_OFFSETS) * stride_col)[None, :])
    tl.store(tile, value.to(ptr.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :])


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------

@triton.jit
def attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, seed_ptr,
        Tq, Tk, d, dv,
        stride_qt, stride_qb, stride_qd, stride_kt, stride_kb, stride_kd,
        stride_vt, stride_vb, stride_vd, stride_ot, stride_ob, stride_od,
        scale_log2, dropout_p, dropout_scale,
        HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Program = (query block, dv block, batch): o[rows, b, dv block] and, for dv block 0, lse[b, rows]."""
    scale_log2, dropout_p, dropout_scale = _fp32(scale_log2), _fp32(dropout_p), _fp32(dropout_scale)
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # most work first
    pid_v = tl.program_id(1)
    batch = tl.program_id(2)
    offset = Tk - Tq
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    q_ptr += batch.to(tl.int64) * stride_qb
    k_ptr += batch.to(tl.int64) * stride_kb
    v_ptr += batch.to(tl.int64) * stride_vb
    o_ptr += batch.to(tl.int64) * stride_ob

    rows = start_m + tl.arange(0, BLOCK_M)  # query positions
    row_valid = rows < Tq
    cols_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    cols_v_valid = cols_v < dv
    q_rows = _offsets(rows, WIDE_OFFSETS) * stride_qt
    v_cols = _offsets(cols_v, WIDE_OFFSETS) * stride_vd

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)  # base-2 units
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # Keys after the block's last visible one are skipped. Key 0 is visible to every row, so the
    # first block makes every row_max finite (no -inf - -inf below).
    end_n = tl.minimum(Tk, tl.minimum(start_m + BLOCK_M, Tq) + offset)
    for start_n in range(0, end_n, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_valid = keys < Tk
        scores = _dot_over_width(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), q_ptr, q_rows, row_valid,
                                 stride_qd, k_ptr, _offsets(keys, WIDE_OFFSETS) * stride_kt, key_valid,
                                 stride_kd, d, BLOCK_DK, DOT_PRECISION, WIDE_OFFSETS)
        visible = (keys[None, :] <= rows[:, None] + offset) & key_valid[None, :]
        scores = tl.where(visible, scores * scale_log2, float("-inf"))  # [BLOCK_M, BLOCK_N]
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        rescale = tl.exp2(row_max - new_max)
        p = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(p, 1)
        row_max = new_max
        if HAS_DROPOUT:
            keep = dropout_keep(seed, batch, Tq, Tk, rows[:, None], keys[None, :], dropout_p)
            p = tl.where(keep, p * dropout_scale, 0.0)
        v = tl.load(v_ptr + (_offsets(keys, WIDE_OFFSETS) * stride_vt)[:, None] + v_cols[None, :],
                    mask=key_valid[:, None] & cols_v_valid[None, :], other=0.0)  # [BLOCK_N, BLOCK_DV]
        acc = tl.dot(p.to(v.dtype), v, acc * rescale[:, None], input_precision=DOT_PRECISION)

    _store_tile(o_ptr, rows, row_valid, stride_ot, cols_v, cols_v_valid, stride_od, acc / row_sum[:, None],
                WIDE_OFFSETS)
    if pid_v == 0:
        tl.store(lse_ptr + batch.to(tl.int64) * Tq + rows, row_max + tl.log2(row_sum), mask=row_valid)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------

@triton.jit
def attention_bwd_delta_kernel(
        o_ptr, do_ptr, delta_ptr, Tq, dv,
        stride_ot, stride_ob, stride_od, stride_dot, stride_dob, stride_dod,
        WIDE_OFFSETS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr):
    """Program = (query block, batch): delta[b, rows] = sum over columns of dO * O, in fp32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < Tq
    batch = tl.program_id(1).to(tl.int64)
    o_rows = o_ptr + batch * stride_ob + _offsets(rows, WIDE_OFFSETS) * stride_ot
    do_rows = do_ptr + batch * stride_dob + _offsets(rows, WIDE_OFFSETS) * stride_dot
    delta = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, dv, BLOCK_DK):
        cols = start + tl.arange(0, BLOCK_DK)
        mask = row_valid[:, None] & (cols < dv)[None, :]
        cols = _offsets(cols, WIDE_OFFSETS)
        o = tl.load(o_rows[:, None] + cols[None, :] * stride_od, mask=mask, other=0.0)
        do = tl.load(do_rows[:, None] + cols[None, :] * stride_dod, mask=mask, other=0.0)
        delta += tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + batch * Tq + rows, delta, mask=row_valid)


@triton.jit
def attention_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, seed_ptr,
        Tq, Tk, d, dv,
        stride_qt, stride_qb, stride_qd, stride_kt, stride_kb, stride_kd,
        stride_vt, stride_vb, stride_vd, stride_dot, stride_dob, stride_dod,
        stride_dkt, stride_dkb, stride_dkd, stride_dvt, stride_dvb, stride_dvd,
        scale, scale_log2, dropout_p, dropout_scale,
        HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program = (key block, column chunk, batch): dK[keys, b, chunk] and dV[keys, b, chunk].

    Works in transposed orientation ([keys, queries] tiles) so both products reduce over queries
    without a transpose in registers.
    """
    scale, scale_log2 = _fp32(scale), _fp32(scale_log2)
    batch, q_ptr, k_ptr, v_ptr, seed, dropout_p, dropout_scale = _program_start(
        q_ptr, k_ptr, v_ptr, stride_qb, stride_kb, stride_vb, seed_ptr, dropout_p, dropout_scale, HAS_DROPOUT)
    start_n = tl.program_id(0) * BLOCK_N
    pid_c = tl.program_id(1)
    offset = Tk - Tq
    do_ptr += batch.to(tl.int64) * stride_dob
    lse_ptr += batch.to(tl.int64) * Tq
    delta_ptr += batch.to(tl.int64) * Tq

    keys = start_n + tl.arange(0, BLOCK_N)
    key_valid = keys < Tk
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    q_cols_valid = cols < d
    v_cols_valid = cols < dv
    cols = _offsets(cols, WIDE_OFFSETS)
    k_rows = _offsets(keys, WIDE_OFFSETS) * stride_kt
    v_rows = _offsets(keys, WIDE_OFFSETS) * stride_vt

    dk_acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    # Query blocks before the first one that sees key start_n are skipped.
    first_m = (tl.maximum(start_n - offset, 0) // BLOCK_M) * BLOCK_M
    for start_m in range(first_m, Tq, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_valid = rows < Tq
        q_rows = _offsets(rows, WIDE_OFFSETS) * stride_qt
        do_rows = _offsets(rows, WIDE_OFFSETS) * stride_dot
        scores_t = _dot_over_width(tl.zeros([BLOCK_N, BLOCK_M], tl.float32), k_ptr, k_rows, key_valid,
                                   stride_kd, q_ptr, q_rows, row_valid, stride_qd, d, BLOCK_DK,
                                   DOT_PRECISION, WIDE_OFFSETS)
        lse = tl.load(lse_ptr + rows, mask=row_valid, other=0.0)
        visible = (keys[:, None] <= rows[None, :] + offset) & row_valid[None, :]
        p_t = tl.where(visible, tl.exp2(scores_t * scale_log2 - lse[None, :]), 0.0)  # [BLOCK_N, BLOCK_M]
        dp_t = _dot_over_width(tl.zeros([BLOCK_N, BLOCK_M], tl.float32), v_ptr, v_rows, key_valid,
                               stride_vd, do_ptr, do_rows, row_valid, stride_dod, dv, BLOCK_DK,
                               DOT_PRECISION, WIDE_OFFSETS)
        delta = tl.load(delta_ptr + rows, mask=row_valid, other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, batch, Tq, Tk, rows[None, :], keys[:, None], dropout_p)
            p_dropped_t = tl.where(keep, p_t * dropout_scale, 0.0)
            dp_t = tl.where(keep, dp_t * dropout_scale, 0.0)
        else:
            p_dropped_t = p_t
        ds_t = p_t * (dp_t - delta[None, :])
        do_chunk = tl.load(do_ptr + do_rows[:, None] + cols[None, :] * stride_dod,
                           mask=row_valid[:, None] & v_cols_valid[None, :], other=0.0)  # [BLOCK_M, BLOCK_C]
        dv_acc = tl.dot(p_dropped_t.to(do_chunk.dtype), do_chunk, dv_acc, input_precision=DOT_PRECISION)
        q_chunk = tl.load(q_ptr + q_rows[:, None] + cols[None, :] * stride_qd,
                          mask=row_valid[:, None] & q_cols_valid[None, :], other=0.0)  # [BLOCK_M, BLOCK_C]
        dk_acc = tl.dot(ds_t.to(q_chunk.dtype), q_chunk, dk_acc, input_precision=DOT_PRECISION)

    _store_tile(dk_ptr + batch.to(tl.int64) * stride_dkb, keys, key_valid, stride_dkt, cols, q_cols_valid,
                stride_dkd, dk_acc * scale, WIDE_OFFSETS)
    _store_tile(dv_ptr + batch.to(tl.int64) * stride_dvb, keys, key_valid, stride_dvt, cols, v_cols_valid,
                stride_dvd, dv_acc, WIDE_OFFSETS)


@triton.jit
def attention_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, seed_ptr,
        Tq, Tk, d, dv,
        stride_qt, stride_qb, stride_qd, stride_kt, stride_kb, stride_kd,
        stride_vt, stride_vb, stride_vd, stride_dot, stride_dob, stride_dod,
        stride_dqt, stride_dqb, stride_dqd,
        scale, scale_log2, dropout_p, dropout_scale,
        HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program = (query block, column chunk, batch): dQ[rows, b, chunk]."""
    scale, scale_log2 = _fp32(scale), _fp32(scale_log2)
    batch, q_ptr, k_ptr, v_ptr, seed, dropout_p, dropout_scale = _program_start(
        q_ptr, k_ptr, v_ptr, stride_qb, stride_kb, stride_vb, seed_ptr, dropout_p, dropout_scale, HAS_DROPOUT)
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # most work first
    pid_c = tl.program_id(1)
    offset = Tk - Tq
    do_ptr += batch.to(tl.int64) * stride_dob

    rows = start_m + tl.arange(0, BLOCK_M)
    row_valid = rows < Tq
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cols_valid = cols < d
    cols = _offsets(cols, WIDE_OFFSETS)
    q_rows = _offsets(rows, WIDE_OFFSETS) * stride_qt
    do_rows = _offsets(rows, WIDE_OFFSETS) * stride_dot
    lse = tl.load(lse_ptr + batch.to(tl.int64) * Tq + rows, mask=row_valid, other=0.0)
    delta = tl.load(delta_ptr + batch.to(tl.int64) * Tq + rows, mask=row_valid, other=0.0)

    dq_acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    end_n = tl.minimum(Tk, tl.minimum(start_m + BLOCK_M, Tq) + offset)
    for start_n in range(0, end_n, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_valid = keys < Tk
        k_rows = _offsets(keys, WIDE_OFFSETS) * stride_kt
        scores = _dot_over_width(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), q_ptr, q_rows, row_valid,
                                 stride_qd, k_ptr, k_rows, key_valid, stride_kd, d, BLOCK_DK,
                                 DOT_PRECISION, WIDE_OFFSETS)
        visible = (keys[None, :] <= rows[:, None] + offset) & row_valid[:, None]
        p = tl.where(visible, tl.exp2(scores * scale_log2 - lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
        dp = _dot_over_width(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), do_ptr, do_rows, row_valid,
                             stride_dod, v_ptr, _offsets(keys, WIDE_OFFSETS) * stride_vt, key_valid,
                             stride_vd, dv, BLOCK_DK, DOT_PRECISION, WIDE_OFFSETS)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, batch, Tq, Tk, rows[:, None], keys[None, :], dropout_p)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        k_chunk = tl.load(k_ptr + k_rows[:, None] + cols[None, :] * stride_kd,
                          mask=key_valid[:, None] & cols_valid[None, :], other=0.0)  # [BLOCK_N, BLOCK_C]
        dq_acc = tl.dot(ds.to(k_chunk.dtype), k_chunk, dq_acc, input_precision=DOT_PRECISION)

    _store_tile(dq_ptr + batch.to(tl.int64) * stride_dqb, rows, row_valid, stride_dqt, cols, cols_valid,
                stride_dqd, dq_acc * scale, WIDE_OFFSETS)


# ------------------------------------------------------------------------------------------------
# Launchers, registered with torch.library
# ------------------------------------------------------------------------------------------------

def _wide_offsets(*tensors: torch.Tensor) -> bool:
    """Whether some element of one batch entry ([T, B, width] tensors) lies 2**31 or more elements
    from the entry's start; the batch offset itself is always 64-bit."""
    return any((t.shape[0] - 1) * abs(t.stride(0)) + (t.shape[2] - 1) * abs(t.stride(2)) >= 2**31
               for t in tensors)


@torch.library.triton_op("sharnn_fast::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                  seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Tq, B, d], k [Tk, B, d], v [Tk, B, dv] -> (out [Tq, B, dv], lse [B, Tq] fp32, base 2).

    dropout_p > 0 drops weights with the philox stream of ``seed`` (a [1] int64 tensor)."""
    Tq, B, d = q.shape
    Tk, dv = k.shape[0], v.shape[-1]
    check_lengths(Tq, Tk)
    out = new_output((Tq, B, dv), q.dtype, q.device)  # [Tq, B, dv]
    lse = new_output((B, Tq), torch.float32, q.device)  # [B, Tq]
    config = launch_config("fwd", q.dtype, interpreted(attention_fwd_kernel), BLOCK_DK=d, BLOCK_DV=dv)
    grid = (triton.cdiv(Tq, config["BLOCK_M"]), triton.cdiv(dv, config["BLOCK_DV"]), B)
    has_dropout = dropout_p > 0.0
    torch.library.wrap_triton(attention_fwd_kernel)[grid](
        q, k, v, out, lse, seed if has_dropout else lse,
        Tq, Tk, d, dv, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        LOG2_E / math.sqrt(d), dropout_p, dropout_scale(dropout_p),
        HAS_DROPOUT=has_dropout, DOT_PRECISION=triton_dot_precision(q.dtype),
        WIDE_OFFSETS=_wide_offsets(q, k, v, out), **config)
    return out, lse


@torch.library.triton_op("sharnn_fast::attention_bwd", mutates_args=())
def attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, dropout_p: float,
                  seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of attention_fwd's out, given grad_out [Tq, B, dv] and its saved lse."""
    Tq, B, d = q.shape
    Tk, dv = k.shape[0], v.shape[-1]
    check_lengths(Tq, Tk)
    device = q.device
    scale = 1.0 / math.sqrt(d)
    has_dropout = dropout_p > 0.0
    seed_arg = seed if has_dropout else lse
    common = (Tq, Tk, d, dv, *q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    dropout_args = (scale, scale * LOG2_E, dropout_p, dropout_scale(dropout_p))
    wide = _wide_offsets(grad_out, q, k, v, out)  # the gradients have the inputs' shapes, contiguous
    precision = triton_dot_precision(q.dtype)
    interpreter = interpreted(attention_fwd_kernel)

    delta = new_output((B, Tq), torch.float32, device)  # [B, Tq]
    config = launch_config("delta", q.dtype, interpreter, BLOCK_DK=dv)
    torch.library.wrap_triton(attention_bwd_delta_kernel)[(triton.cdiv(Tq, config["BLOCK_M"]), B)](
        out, grad_out, delta, Tq, dv, *out.stride(), *grad_out.stride(), WIDE_OFFSETS=wide, **config)

    dq = new_output(q.shape, q.dtype, device)  # [Tq, B, d]
    dk = new_output(k.shape, k.dtype, device)  # [Tk, B, d]
    dv_ = new_output(v.shape, v.dtype, device)  # [Tk, B, dv]
    config = launch_config("dkdv", q.dtype, interpreter, BLOCK_DK=max(d, dv), BLOCK_C=max(d, dv))
    grid = (triton.cdiv(Tk, config["BLOCK_N"]), triton.cdiv(max(d, dv), config["BLOCK_C"]), B)
    torch.library.wrap_triton(attention_bwd_dkdv_kernel)[grid](
        q, k, v, grad_out, lse, delta, dk, dv_, seed_arg, *common, *dk.stride(), *dv_.stride(),
        *dropout_args, HAS_DROPOUT=has_dropout, DOT_PRECISION=precision, WIDE_OFFSETS=wide, **config)

    config = launch_config("dq", q.dtype, interpreter, BLOCK_DK=max(d, dv), BLOCK_C=d)
    grid = (triton.cdiv(Tq, config["BLOCK_M"]), triton.cdiv(d, config["BLOCK_C"]), B)
    torch.library.wrap_triton(attention_bwd_dq_kernel)[grid](
        q, k, v, grad_out, lse, delta, dq, seed_arg, *common, *dq.stride(),
        *dropout_args, HAS_DROPOUT=has_dropout, DOT_PRECISION=precision, WIDE_OFFSETS=wide, **config)
    return dq, dk, dv_


def _setup_context(ctx, inputs, output):
    q, k, v, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seed)
    ctx.dropout_p = dropout_p
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, seed = ctx.saved_tensors
    dq, dk, dv = attention_bwd(grad_out, q, k, v, out, lse, ctx.dropout_p, seed)
    return dq, dk, dv, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
