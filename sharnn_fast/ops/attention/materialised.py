"""The plan the two materialised-scores attention paths share (the "torch" backend's wide path in
``torch_native.py`` and the "triton" backend's in ``triton_wide.py``): which heads take it, how the
work is split under a scratch budget, the float32 products and the backward's chunk loop
(:func:`backward_products`). No kernels, no Triton import.

Materialised scores: S = Q K^T is written to memory by a cuBLAS GEMM, the softmax runs over it, and
O = P V is a second GEMM. For a wide head this beats flash attention (see WIDE_HEAD_MIN_D), and it is
the published SHA-RNN's own computation (explicit products and a softmax).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from .._dtypes import no_autocast

# Heads at least this wide take the materialised path; narrower ones a flash kernel (SDPA's for the
# "torch" backend, triton_flash.py's for "triton"). Why 257: up to d = 256 a flash kernel holds a whole
# head's output tile on chip and never writes the Tq x Tk scores, the regime flash attention is built
# for (FlashAttention, cuDNN and SDPA's flash kernel all stop at 256; SDPA then falls back to its
# memory-efficient kernel). Above it, the materialised path's extra traffic (about 12 bytes a score
# forward, 26 backward, in bf16) is paid once against 4d (forward) or 10d (backward) FLOPs a score,
# so it costs relatively less the wider the head.
# Measured (H200, bf16, B 16, Tq 1024, d 1024, dropout 0.1 in training; benchmarks/results/
# 2026-12-04_nvidia-h200_3c60ba7.md): the triton wide path against SDPA's memory-efficient kernel,
# forward+backward 2.59 vs 6.98 ms at Tk 1024 and 4.44 vs 22.2 ms at Tk 5000; forward 1.26 vs 2.70 ms
# at Tk 5000, but 0.654 vs 0.471 ms at Tk 1024 (no memory, inference only).
WIDE_HEAD_MIN_D = 257

# Most bytes of scratch one pass may hold at once (forward or backward; the op's inputs, outputs and
# saved statistics are not counted). 1 GiB holds the paper's size (B 16, Tq 1024, Tk 5000, bf16) in
# one chunk for the triton path, forward (0.49 GB) and backward (0.98 GB). Tests lower it to force
# the chunked path.
SCORES_MEMORY_BUDGET = 1 << 30


def autocast_off(device: torch.device):
    """Autocast off inside the ops: their inputs already are in the dtype to compute in, and the fp32
    products must stay fp32. Meta tensors (the offline compile report) have no autocast."""
    return no_autocast(device) if torch.amp.is_autocast_available(device.type) else contextlib.nullcontext()


def uses_materialised_scores(d: int) -> bool:
    """Whether a head of width ``d`` takes the materialised path (d >= WIDE_HEAD_MIN_D)."""
    return d >= WIDE_HEAD_MIN_D


def scratch_bytes_per_score(dtype: torch.dtype, backward: bool) -> int:
    """Bytes of scratch per (batch entry, query, key) score of the triton path: S in fp32 and P in
    ``dtype`` (written over S for float32), and in backward dP~ and dS as well."""
    per_product = 4 + (0 if dtype == torch.float32 else torch.empty((), dtype=dtype).element_size())
    return 2 * per_product if backward else per_product


def chunk_plan(B: int, Tq: int, Tk: int, d: int, dv: int, dtype: torch.dtype, backward: bool,
               budget: Optional[int] = None, score_bytes: Optional[int] = None) -> tuple[int, int]:
    """(batch entries, queries) per chunk so a pass's scratch stays within ``budget`` bytes
    (default SCORES_MEMORY_BUDGET), at ``score_bytes`` bytes a score (default: the triton path's,
    :func:`scratch_bytes_per_score`). Whole batch entries first: then dK and dV come out of one
    product each; query chunks (one entry at a time) only when one entry alone does not fit. The
    smallest chunk, one query row of one entry, is taken even when it alone exceeds the budget."""
    budget = SCORES_MEMORY_BUDGET if budget is None else budget
    if score_bytes is None:
        score_bytes = scratch_bytes_per_score(dtype, backward)
    entry_bytes = Tq * Tk * score_bytes
    if entry_bytes <= budget:
        return min(B, budget // entry_bytes), Tq
    accumulators = Tk * (d + dv) * 4 if backward else 0  # fp32 dK, dV of the entry
    return 1, max(1, min(Tq, (budget - accumulators) // (Tk * score_bytes)))


def chunks(B: int, Tq: int, plan: tuple[int, int]):
    """(first entry, end entry, [(first query, end query), ...]) for each group of batch entries."""
    batch_step, query_step = plan
    queries = [(r, min(r + query_step, Tq)) for r in range(0, Tq, query_step)]
    return [(b, min(b + batch_step, B), queries) for b in range(0, B, batch_step)]


def bmm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (batched) in float32: products and sums in fp32, fp32 result. On CUDA, cuBLAS with a
    float32 output for 16-bit operands (as fast as a 16-bit output); elsewhere the operands are
    widened first, the same values (a product of two 16-bit numbers is exact in fp32)."""
    if a.dtype == torch.float32:
        return torch.bmm(a, b)
    if a.device.type == "cuda":
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b."""
    if a.dtype == torch.float32:
        acc.baddbmm_(a, b)
    else:
        acc.add_(bmm_fp32(a, b))


def backward_products(qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, dob: torch.Tensor,
                      dqb: torch.Tensor, dkb: torch.Tensor, dvb: torch.Tensor, plan: tuple[int, int],
                      score_gradients: Callable) -> None:
    """The products of a materialised backward, chunk by chunk of ``plan`` (:func:`chunk_plan`).

    qb [B, Tq, d], kb [B, Tk, d], vb [B, Tk, dv], dob [B, Tq, dv] and dqb, dkb, dvb (shaped like qb,
    kb, vb) are the batch-first views (:func:`batch_first`) of q, k, v, the output's gradient and the
    gradients to write, all in one dtype. For each
    chunk of batch entries b0 .. b1 - 1 and queries r0 .. r1 - 1, ``score_gradients(b0, b1, r0, r1,
    q_c, k_c, v_c, do_c)`` gets the chunk's slices (k_c and v_c: the keys its last query sees) and
    returns (dS, P~), each [Bc, Tc, keys] in that dtype: the scores' gradient, 1/sqrt(d) included,
    and the weights after dropout. This writes dQ = dS K, dK = dS^T Q and dV = P~^T dO; over several
    query chunks of an entry, dK and dV add up in float32 and are rounded once at the end."""
    B, Tq, d = qb.shape
    Tk, dv = kb.shape[1], vb.shape[-1]
    for b0, b1, query_chunks in chunks(B, Tq, plan):
        accumulate = len(query_chunks) > 1
        if accumulate:
            dk_acc = torch.zeros(b1 - b0, Tk, d, dtype=torch.float32, device=qb.device)  # [Bc, Tk, d]
            dv_acc = torch.zeros(b1 - b0, Tk, dv, dtype=torch.float32, device=qb.device)  # [Bc, Tk, dv]
        for r0, r1 in query_chunks:
            keys = Tk - Tq + r1  # the keys the chunk's last query sees
            q_c, k_c, v_c, do_c = qb[b0:b1, r0:r1], kb[b0:b1, :keys], vb[b0:b1, :keys], dob[b0:b1, r0:r1]
            dscores, dropped = score_gradients(b0, b1, r0, r1, q_c, k_c, v_c, do_c)
            torch.bmm(dscores, k_c, out=dqb[b0:b1, r0:r1])
            if accumulate:
                add_product(dk_acc[:, :keys], dscores.transpose(1, 2), q_c)
                add_product(dv_acc[:, :keys], dropped.transpose(1, 2), do_c)
            else:  # one chunk of all Tq queries: keys == Tk
                torch.bmm(dscores.transpose(1, 2), q_c, out=dkb[b0:b1])
                torch.bmm(dropped.transpose(1, 2), do_c, out=dvb[b0:b1])
        if accumulate:
            dkb[b0:b1].copy_(dk_acc)
            dvb[b0:b1].copy_(dv_acc)


def batch_first(*tensors: torch.Tensor):
    """[T, B, width] -> [B, T, width] views (no copies: torch.bmm takes the strides)."""
    return tuple(t.transpose(0, 1) for t in tensors)


def describe_plan(B: int, Tq: int, Tk: int, d: int, dv: int, dtype: torch.dtype,
                  score_bytes: Optional[dict] = None) -> str:
    """"forward in chunks of ... , backward in chunks of ... (budget ...)" for explain()."""
    plans = []
    for name, backward in (("forward", False), ("backward", True)):
        per_score = None if score_bytes is None else score_bytes[backward]
        batch_step, query_step = chunk_plan(B, Tq, Tk, d, dv, dtype, backward, score_bytes=per_score)
        plans.append(f"{name} in chunks of {batch_step} batch entries x {query_step} queries")
    return f"{', '.join(plans)} (budget {SCORES_MEMORY_BUDGET / 2**30:.3g} GiB of scratch)"
