"""The triton backend's attention for wide heads: the scores materialised, cuBLAS for the products.

Same contract as the flash kernel of ``triton_flash.py`` (sequence-first q [Tq, B, d], k [Tk, B, d],
v [Tk, B, dv], Tk >= Tq, scale 1/sqrt(d), causal mask aligned to the end: query i sees keys
0 .. Tk - Tq + i); ``triton.py``'s ``attention_triton`` sends a head here when it is at least
materialised.WIDE_HEAD_MIN_D wide (materialised.py: the threshold, the chunk plan, the fp32 products
and the backward's products, shared with the "torch" backend's wide path).

Forward, per chunk of batch entries and queries (see "Memory" below):
  S = Q K^T (torch.bmm: cuBLAS on a GPU), float32 [Bc, Tc, Tk'];
  one Triton kernel per query row: scale, bottom-right causal mask, softmax (base 2, the row's max
  and sum in fp32 registers), dropout, P written in the input dtype; the row's log-sum-exp (fp32,
  base 2) kept for backward;
  O = P V (torch.bmm).
Backward, per chunk: S = Q K^T again and dP~ = dO V^T (float32, torch.bmm); one Triton kernel per
query row recomputes P from S and the saved log-sum-exp, regenerates the dropout mask, computes
delta = rowsum(P~ * dP~) and writes P~ (P after dropout) and dS = P * (dP - delta) / sqrt(d) in the
input dtype; then dV = P~^T dO, dQ = dS K, dK = dS^T Q (torch.bmm). Tk' = Tk - Tq + (the chunk's last
query) + 1: keys no query of the chunk sees are never multiplied.

Dtypes, and why:
- S and dP~ are float32 (cuBLAS accumulates in fp32 and writes fp32; on CPU the operands are widened
  first, the same values): rounding a score of magnitude |s| to bf16 moves its exponent by up to
  |s| * 2**-9, about 1% of a weight at |s| = 4, several times the output's own rounding; fp16 scores
  can overflow; and dS = P (dP - delta) cancels.
- P, P~ and dS are in the input dtype: they only feed the next products, which take that dtype (the
  flash kernel rounds P the same way before its dot). float32 inputs write P over S and dS over dP~
  in place.
- The row statistics (max, sum, log-sum-exp, delta) are float32.
- float32 inputs: float32 cuBLAS GEMMs (TF32 only if torch.backends.cuda.matmul.allow_tf32 says so).

Dropout: keep(b, i, j) = philox(seed, (b * Tq + i) * Tk + j) >= p, the flash kernel's own rule
(``triton_common.dropout_keep``), so both paths drop the same weights for the same seed, and the backward
regenerates the mask from the seed instead of storing it.

Memory: a pass's scratch (S, P and in backward dP~, dS, see materialised.scratch_bytes_per_score) for all of
[B, Tq, Tk] may be large (12 bytes a score in bf16 backward: 0.98 GB at B 16, Tq 1024, Tk 5000). Above
materialised.SCORES_MEMORY_BUDGET the work is split: first into groups of batch entries, and when one entry
alone does not fit, into chunks of queries of one entry (dK and dV then add up over the chunks in
float32 accumulators, counted in the budget). The smallest chunk, one query row of one entry
(Tk scores), is taken even when it alone exceeds the budget.

Registered as torch.library custom ops ``sharnn_fast::attention_wide_fwd`` / ``attention_wide_bwd``
with register_fake and register_autograd: torch.compile sees one node each (the kernels are opaque
to it, like cuBLAS), and the fake implementations give it shapes on any device.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .._kernels import interpreted, new_output
from .materialised import autocast_off, backward_products, batch_first, bmm_fp32, chunk_plan, chunks
from .triton_common import LOG2_E, check_lengths, dropout_keep, dropout_scale

# Tuning of the softmax kernels, the only place it lives. GPU: a program holds at most
# GPU_MAX_BLOCK_N scores in registers at once; a longer row takes two passes over memory (statistics,
# then the writes), shorter rows are packed up to GPU_MAX_BLOCK_M to a program. 8192 covers the
# paper's Tk = 5000 in one pass, 16 fp32 values of each [rows, keys] tensor per thread with 16 warps
# (VALUES_PER_THREAD); checked by the offline compile report, not yet timed. Interpreter: rows in
# blocks of 32 keys, so the tests' short rows take both the one-block and the two-pass code, and 16
# rows a program to keep the number of interpreted programs small.
GPU_MAX_BLOCK_N = 8192
GPU_MAX_BLOCK_M = 16
VALUES_PER_THREAD = 16  # num_warps = BLOCK_M * BLOCK_N / (32 * this), between 4 and 16
INTERPRETER_BLOCK_N = 32
INTERPRETER_BLOCK_M = 16


# ------------------------------------------------------------------------------------------------
# Kernels: one program per (block of BLOCK_M query rows of the chunk, batch entry of the chunk)
# ------------------------------------------------------------------------------------------------
# The score buffers are contiguous along keys; rows and entries are addressed with int64 offsets.
# A row's statistics live in registers.

@triton.jit
def _program_rows(first_batch, first_query, Tq, Tk, n_rows, BLOCK_M: tl.constexpr):
    """This program's rows: its batch entry of the chunk and that entry's batch index; its BLOCK_M
    rows of the chunk (rows past the chunk's end repeat its last one, never stored) and which are
    real; their query indices; how many keys each sees (keys 0 .. visible - 1, at most the chunk's
    row length); and how many the last real one sees."""
    entry = tl.program_id(1)
    block_rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.minimum(block_rows, n_rows - 1)
    queries = first_query + rows
    last_visible = Tk - Tq + first_query + tl.minimum(tl.program_id(0) * BLOCK_M + BLOCK_M, n_rows)
    return entry, first_batch + entry, rows, block_rows < n_rows, queries, Tk - Tq + queries + 1, last_visible


@triton.jit
def _rows(ptr, entry, stride_b, rows, stride_q):
    """Pointers to the starts of ``rows`` of batch entry ``entry`` of a [Bc, Tc, keys] buffer."""
    return ptr + entry.to(tl.int64) * stride_b + rows.to(tl.int64) * stride_q


@triton.jit
def _scores_log2(s_rows, keys, visible, scale_log2):
    """A [rows, keys] block of scores in base-2 units (S log2(e) / sqrt(d)); -inf where masked."""
    return tl.load(s_rows[:, None] + keys[None, :], mask=keys[None, :] < visible[:, None],
                   other=float("-inf")) * scale_log2


@triton.jit
def _after_dropout(p, seed, batch, Tq, Tk, queries, keys, dropout_p, dropout_scale, HAS_DROPOUT: tl.constexpr):
    if HAS_DROPOUT:
        keep = dropout_keep(seed, batch, Tq, Tk, queries[:, None], keys[None, :], dropout_p)
        p = tl.where(keep, p * dropout_scale, 0.0)
    return p


@triton.jit(do_not_specialize=["first_batch", "first_query"])
def attention_wide_softmax_fwd_kernel(
        s_ptr, p_ptr, lse_ptr, seed_ptr, first_batch, first_query, Tq, Tk, n_rows, row_len,
        stride_sb, stride_sq, stride_pb, stride_pq, stride_lse_b,
        scale_log2, dropout_p, dropout_scale,
        HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """P[entry, rows, :row_len] = dropout(softmax(S[entry, rows] / sqrt(d), causal)) and each row's
    log-sum-exp (base 2) into lse[batch, query]. ONE_BLOCK: a row fits one block of registers."""
    entry, batch, rows, row_valid, queries, visible, last_visible = _program_rows(
        first_batch, first_query, Tq, Tk, n_rows, BLOCK_M)
    s_rows = _rows(s_ptr, entry, stride_sb, rows, stride_sq)
    p_rows = _rows(p_ptr, entry, stride_pb, rows, stride_pq)
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    if ONE_BLOCK:
        keys = tl.arange(0, BLOCK_N)
        x = _scores_log2(s_rows, keys, visible, scale_log2)
        row_max = tl.max(x, 1)
        e = tl.exp2(x - row_max[:, None])
        row_sum = tl.sum(e, 1)
        lse = row_max + tl.log2(row_sum)
        p = _after_dropout(e / row_sum[:, None], seed, batch, Tq, Tk, queries, keys, dropout_p, dropout_scale,
                           HAS_DROPOUT)
        tl.store(p_rows[:, None] + keys[None, :], p.to(p_ptr.dtype.element_ty),
                 mask=row_valid[:, None] & (keys < row_len)[None, :])
    else:
        # Online max and sum over the keys the block's rows see, then P block by block (0 where masked).
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, last_visible, BLOCK_N):
            x = _scores_log2(s_rows, start + tl.arange(0, BLOCK_N), visible, scale_log2)
            new_max = tl.maximum(row_max, tl.max(x, 1))
            row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(tl.exp2(x - new_max[:, None]), 1)
            row_max = new_max
        lse = row_max + tl.log2(row_sum)
        for start in range(0, row_len, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            p = tl.exp2(_scores_log2(s_rows, keys, visible, scale_log2) - lse[:, None])
            p = _after_dropout(p, seed, batch, Tq, Tk, queries, keys, dropout_p, dropout_scale, HAS_DROPOUT)
            tl.store(p_rows[:, None] + keys[None, :], p.to(p_ptr.dtype.element_ty),
                     mask=row_valid[:, None] & (keys < row_len)[None, :])
    tl.store(lse_ptr + batch.to(tl.int64) * stride_lse_b + queries, lse, mask=row_valid)


@triton.jit
def _block_bwd(s_rows, dp_rows, keys, visible, lse, scale_log2, seed, batch, Tq, Tk, queries,
               dropout_p, dropout_scale, HAS_DROPOUT: tl.constexpr):
    """A [rows, keys] block: the weights P (0 where masked), P~ = P after dropout, and the gradient
    reaching P (dP~ through the dropout: dP~ * keep / (1 - p))."""
    p = tl.exp2(_scores_log2(s_rows, keys, visible, scale_log2) - lse[:, None])
    dp = tl.load(dp_rows[:, None] + keys[None, :], mask=keys[None, :] < visible[:, None], other=0.0)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, batch, Tq, Tk, queries[:, None], keys[None, :], dropout_p)
        p_dropped = tl.where(keep, p * dropout_scale, 0.0)
        dp = tl.where(keep, dp * dropout_scale, 0.0)
    else:
        p_dropped = p
    return p, p_dropped, dp


@triton.jit
def _store_bwd(p_rows, ds_rows, keys, row_valid, row_len, p, p_dropped, dp, delta, scale):
    mask = row_valid[:, None] & (keys < row_len)[None, :]
    tl.store(p_rows[:, None] + keys[None, :], p_dropped.to(p_rows.dtype.element_ty), mask=mask)
    ds = p * (dp - delta[:, None]) * scale
    tl.store(ds_rows[:, None] + keys[None, :], ds.to(ds_rows.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["first_batch", "first_query"])
def attention_wide_softmax_bwd_kernel(
        s_ptr, dp_ptr, lse_ptr, p_ptr, ds_ptr, seed_ptr, first_batch, first_query, Tq, Tk, n_rows, row_len,
        stride_sb, stride_sq, stride_dpb, stride_dpq, stride_pb, stride_pq, stride_dsb, stride_dsq,
        stride_lse_b, scale, scale_log2, dropout_p, dropout_scale,
        HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """From S and dP~ = dO V^T (fp32) of a block of rows and their saved log-sum-exp: P~[entry, rows]
    (P after dropout, for dV) and dS[entry, rows] = P * (dP - delta) / sqrt(d) (for dQ and dK), where
    delta = sum_j P~_j dP~_j = rowsum(dO * O). p_ptr / ds_ptr may be s_ptr / dp_ptr (in place)."""
    entry, batch, rows, row_valid, queries, visible, last_visible = _program_rows(
        first_batch, first_query, Tq, Tk, n_rows, BLOCK_M)
    s_rows = _rows(s_ptr, entry, stride_sb, rows, stride_sq)
    dp_rows = _rows(dp_ptr, entry, stride_dpb, rows, stride_dpq)
    p_rows = _rows(p_ptr, entry, stride_pb, rows, stride_pq)
    ds_rows = _rows(ds_ptr, entry, stride_dsb, rows, stride_dsq)
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    lse = tl.load(lse_ptr + batch.to(tl.int64) * stride_lse_b + queries, mask=row_valid, other=0.0)
    if ONE_BLOCK:
        keys = tl.arange(0, BLOCK_N)
        p, p_dropped, dp = _block_bwd(s_rows, dp_rows, keys, visible, lse, scale_log2, seed, batch, Tq, Tk,
                                      queries, dropout_p, dropout_scale, HAS_DROPOUT)
        _store_bwd(p_rows, ds_rows, keys, row_valid, row_len, p, p_dropped, dp, tl.sum(p * dp, 1), scale)
    else:
        delta = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, last_visible, BLOCK_N):
            p, p_dropped, dp = _block_bwd(s_rows, dp_rows, start + tl.arange(0, BLOCK_N), visible, lse,
                                          scale_log2, seed, batch, Tq, Tk, queries, dropout_p, dropout_scale,
                                          HAS_DROPOUT)
            delta += tl.sum(p * dp, 1)
        for start in range(0, row_len, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            p, p_dropped, dp = _block_bwd(s_rows, dp_rows, keys, visible, lse, scale_log2, seed, batch, Tq, Tk,
                                          queries, dropout_p, dropout_scale, HAS_DROPOUT)
            _store_bwd(p_rows, ds_rows, keys, row_valid, row_len, p, p_dropped, dp, delta, scale)


def launch_config(row_len: int, interpreter: bool) -> dict:
    """Block sizes and launch options of the softmax kernels (forward and backward) for rows of
    ``row_len`` scores: BLOCK_N keys of a row at a time, BLOCK_M rows per program, ONE_BLOCK when a
    row fits one block; on a GPU or (``interpreter``) in Triton's interpreter. The launchers take
    them from here only, so tools/compile_report.py compiles what runs."""
    block_n = triton.next_power_of_2(int(row_len))
    if interpreter:
        block_n = min(INTERPRETER_BLOCK_N, block_n)
        return dict(BLOCK_M=INTERPRETER_BLOCK_M, BLOCK_N=block_n, ONE_BLOCK=block_n >= row_len)
    block_n = min(GPU_MAX_BLOCK_N, block_n)
    block_m = min(GPU_MAX_BLOCK_M, GPU_MAX_BLOCK_N // block_n)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, ONE_BLOCK=block_n >= row_len,
                num_warps=max(4, min(16, block_m * block_n // (32 * VALUES_PER_THREAD))))


# ------------------------------------------------------------------------------------------------
# Launchers, registered with torch.library
# ------------------------------------------------------------------------------------------------

def _check_seed(dropout_p: float, seed: Optional[torch.Tensor]) -> None:
    if dropout_p > 0.0 and seed is None:
        raise ValueError(f"dropout_p = {dropout_p} needs seed, a [1] int64 tensor; got None")


@torch.library.custom_op("sharnn_fast::attention_wide_fwd", mutates_args=())
def attention_wide_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                       seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Tq, B, d], k [Tk, B, d], v [Tk, B, dv] -> (out [Tq, B, dv], lse [B, Tq] fp32, base 2).

    dropout_p > 0 drops weights with the philox stream of ``seed`` (a [1] int64 tensor).
    Raises ValueError for Tk < Tq or dropout without a seed."""
    Tq, B, d = q.shape
    Tk, dv = k.shape[0], v.shape[-1]
    check_lengths(Tq, Tk)
    _check_seed(dropout_p, seed)
    out = new_output((Tq, B, dv), q.dtype, q.device)  # [Tq, B, dv]
    lse = new_output((B, Tq), torch.float32, q.device)  # [B, Tq]
    qb, kb, vb, ob = batch_first(q, k, v, out)
    has_dropout = dropout_p > 0.0
    scale_log2 = LOG2_E / math.sqrt(d)
    with autocast_off(q.device):
        for b0, b1, query_chunks in chunks(B, Tq, chunk_plan(B, Tq, Tk, d, dv, q.dtype, backward=False)):
            for r0, r1 in query_chunks:
                keys = Tk - Tq + r1  # the keys the chunk's last query sees
                scores = bmm_fp32(qb[b0:b1, r0:r1], kb[b0:b1, :keys].transpose(1, 2))  # [Bc, Tc, keys]
                probs = scores if q.dtype == torch.float32 else new_output(scores.shape, q.dtype, q.device)
                config = launch_config(keys, interpreted(attention_wide_softmax_fwd_kernel))
                attention_wide_softmax_fwd_kernel[(triton.cdiv(r1 - r0, config["BLOCK_M"]), b1 - b0)](
                    scores, probs, lse, seed if has_dropout else lse, b0, r0, Tq, Tk, r1 - r0, keys,
                    scores.stride(0), scores.stride(1), probs.stride(0), probs.stride(1), lse.stride(0),
                    scale_log2, dropout_p, dropout_scale(dropout_p), HAS_DROPOUT=has_dropout, **config)
                torch.bmm(probs, vb[b0:b1, :keys], out=ob[b0:b1, r0:r1])
    return out, lse


@attention_wide_fwd.register_fake
def _(q, k, v, dropout_p, seed):
    check_lengths(q.shape[0], k.shape[0])
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1]), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("sharnn_fast::attention_wide_bwd", mutates_args=())
def attention_wide_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       lse: torch.Tensor, dropout_p: float,
                       seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of attention_wide_fwd's out, given grad_out [Tq, B, dv] and its lse."""
    Tq, B, d = q.shape
    Tk, dv = k.shape[0], v.shape[-1]
    check_lengths(Tq, Tk)
    _check_seed(dropout_p, seed)
    device, dtype = q.device, q.dtype
    dq = new_output(q.shape, dtype, device)  # [Tq, B, d]
    dk = new_output(k.shape, dtype, device)  # [Tk, B, d]
    dv_ = new_output(v.shape, dtype, device)  # [Tk, B, dv]
    qb, kb, vb, dob, dqb, dkb, dvb = batch_first(q, k, v, grad_out, dq, dk, dv_)
    has_dropout = dropout_p > 0.0
    scale = 1.0 / math.sqrt(d)
    in_place = dtype == torch.float32

    def score_gradients(b0, b1, r0, r1, q_c, k_c, v_c, do_c):
        keys = k_c.shape[1]
        scores = bmm_fp32(q_c, k_c.transpose(1, 2))  # [Bc, Tc, keys]
        dprobs = bmm_fp32(do_c, v_c.transpose(1, 2))  # [Bc, Tc, keys]
        if in_place:
            probs, dscores = scores, dprobs
        else:
            probs = new_output(scores.shape, dtype, device)  # P after dropout
            dscores = new_output(scores.shape, dtype, device)  # dS / sqrt(d)
        config = launch_config(keys, interpreted(attention_wide_softmax_bwd_kernel))
        attention_wide_softmax_bwd_kernel[(triton.cdiv(r1 - r0, config["BLOCK_M"]), b1 - b0)](
            scores, dprobs, lse, probs, dscores, seed if has_dropout else lse, b0, r0, Tq, Tk, r1 - r0, keys,
            scores.stride(0), scores.stride(1), dprobs.stride(0), dprobs.stride(1),
            probs.stride(0), probs.stride(1), dscores.stride(0), dscores.stride(1), lse.stride(0),
            scale, scale * LOG2_E, dropout_p, dropout_scale(dropout_p),
            HAS_DROPOUT=has_dropout, **config)
        return dscores, probs

    with autocast_off(device):
        backward_products(qb, kb, vb, dob, dqb, dkb, dvb, chunk_plan(B, Tq, Tk, d, dv, dtype, backward=True),
                          score_gradients)
    return dq, dk, dv_


@attention_wide_bwd.register_fake
def _(grad_out, q, k, v, lse, dropout_p, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, dropout_p, seed = inputs
    _, lse = output
    ctx.save_for_backward(q, k, v, lse, seed)
    ctx.dropout_p = dropout_p
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, lse, seed = ctx.saved_tensors
    dq, dk, dv = attention_wide_bwd(grad_out, q, k, v, lse, ctx.dropout_p, seed)
    return dq, dk, dv, None, None


attention_wide_fwd.register_autograd(_backward, setup_context=_setup_context)

