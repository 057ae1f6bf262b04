"""The "torch" backend's attention: PyTorch's own kernels, with two paths.

- **SDPA** (``scaled_dot_product_attention``: flash, cuDNN, memory-efficient or math, whichever SDPA
  picks) for heads up to 256 wide, and on every device but CUDA.
- **Materialised scores** for wider heads on CUDA (the paper's d = 1024): the published model's own
  math, scores ``S = Q K^T`` and ``O = P V`` as cuBLAS products in the compute dtype (fp32
  accumulation, S written in fp32), the bottom-right causal mask, softmax in float32, dropout on the
  weights. Wider than 256, SDPA's flash and cuDNN kernels refuse and its memory-efficient kernel is
  several times slower than two GEMMs (figures in materialised.py). The plan (threshold, chunks under
  a scratch budget, fp32 products) is materialised.py's, shared with the triton backend's wide path.

:func:`torch_path` is the one place the choice is made; ``explain()`` names the path that ran.

The materialised path is a torch.library custom op (``sharnn_fast::attention_scores_fwd`` / ``_bwd``,
with register_fake and register_autograd): torch.compile sees one node, and the backward recomputes
the scores from Q, K and the saved row log-sum-exp instead of keeping [B, Tq, Tk] fp32 probabilities
alive between forward and backward. What it keeps: the row log-sum-exp (fp32 [B, Tq]) and, with
dropout, the keep mask (bool [B, Tq, Tk], 1 byte a score: 82 MB at B 16, Tq 1024, Tk 5000). The mask
is drawn from torch's default generator, chunk by chunk, so ``torch.manual_seed`` reproduces it.
Its gradients are first-order only (the backend's Implementation says so; a higher-order gradient
raises).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ...backend import note_path
from .._dtypes import compute_dtype
from .._kernels import new_output
from . import materialised
from .materialised import autocast_off, backward_products, batch_first, bmm_fp32, chunk_plan, chunks

# Bytes of scratch a score of one chunk holds at once, forward and backward (see the ops below):
# forward S (fp32, masked and exponentiated in place), a fp32 temporary (log-sum-exp or the dropout
# draw) and P in the compute dtype; backward S/P and dP (fp32), two fp32 temporaries (P~ and P * dP)
# and P~ and dS in the compute dtype.
SCORE_BYTES = {False: 12, True: 20}


def torch_path(device: torch.device, d: int, dtype: torch.dtype) -> str:
    """"materialised" or "sdpa": which path the torch backend takes for a head of width ``d`` in
    compute dtype ``dtype``.

    Materialised on CUDA from materialised.WIDE_HEAD_MIN_D (257) up in float32, float16 and
    bfloat16, where SDPA has no flash or cuDNN kernel; SDPA otherwise (float64 too: the materialised
    path keeps its statistics in fp32). On CPU SDPA stays at every width: its CPU flash kernel beats
    the reference there (benchmarks/results/, CPU runs), and nothing has measured the materialised
    path against it on a CPU."""
    if (device.type == "cuda" and materialised.uses_materialised_scores(d)
            and dtype in (torch.float32, torch.float16, torch.bfloat16)):
        return "materialised"
    return "sdpa"


def _describe(q, k, v, path: str, forced: bool) -> str:
    Tq, B, d = q.shape
    why = "asked for by the caller (path=...)" if forced else (
        f"head width d = {d} {'>=' if path == 'materialised' else '<'} WIDE_HEAD_MIN_D = "
        f"{materialised.WIDE_HEAD_MIN_D} on {q.device.type}" if q.device.type == "cuda"
        else f"SDPA on {q.device.type} at every width")
    if path == "sdpa":
        return f"scaled_dot_product_attention: {why}"
    return (f"materialised scores: {why}; cuBLAS products, fp32 softmax; "
            f"{materialised.describe_plan(B, Tq, k.shape[0], d, v.shape[-1], q.dtype, SCORE_BYTES)}")


def _bottom_right_causal_mask(Tq: int, Tk: int, device):
    """The mask SDPA takes when the keys have a memory in front (Tk > Tq): query i sees keys
    0 .. Tk - Tq + i. On CUDA, torch's ``causal_lower_right`` bias lets SDPA's memory-efficient
    kernel apply it without materialising [Tq, Tk]; elsewhere SDPA would materialise it anyway, and
    importing it costs seconds (torch.nn.attention.bias imports torch._dynamo), so a first call on
    CPU builds the boolean mask directly."""
    if device.type == "cuda":
        from torch.nn.attention.bias import causal_lower_right
        return causal_lower_right(Tq, Tk)
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(Tk - Tq)  # [Tq, Tk], True = attend


def _attention_sdpa(q, k, v, dropout_p):
    Tq, Tk = q.shape[0], k.shape[0]
    # [T, B, d] -> [B, 1 head, T, d] as a view: SDPA takes strided inputs.
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(1) for t in (q, k, v))
    if Tq == Tk:
        y = F.scaled_dot_product_attention(q4, k4, v4, dropout_p=dropout_p, is_causal=True)
    else:
        # is_causal aligns the mask to the top-left; a memory in front needs bottom-right.
        y = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=_bottom_right_causal_mask(Tq, Tk, q.device),
                                           dropout_p=dropout_p)
    return y.squeeze(1).transpose(0, 1)  # [Tq, B, dv]


def attention_torch(q, k, v, dropout_p=0.0, training=False, path: Optional[str] = None):
    """ops.attention's arguments -> [Tq, B, dv] in the compute dtype. ``path`` ("sdpa" or
    "materialised") overrides :func:`torch_path` (tests and benchmarks). Raises ValueError for
    another ``path``."""
    if path not in (None, "sdpa", "materialised"):
        raise ValueError(f"path must be None, 'sdpa' or 'materialised', got {path!r}")
    dtype = compute_dtype(q)
    chosen = torch_path(q.device, q.shape[-1], dtype) if path is None else path
    note_path("attention", lambda: _describe(q, k, v, chosen, forced=path is not None))
    p = float(dropout_p) if training else 0.0
    if chosen == "sdpa":
        return _attention_sdpa(q, k, v, p)
    if dtype == torch.float64:
        raise ValueError("the materialised path computes float32, float16 and bfloat16; got float64 "
                         "(path='sdpa' or backend='reference' take it)")
    # The products run in the compute dtype (the autocast dtype under autocast, as autocast would).
    return attention_scores_fwd(q.to(dtype), k.to(dtype), v.to(dtype), p)[0]


# ------------------------------------------------------------------------------------------------
# The materialised path, per chunk of batch entries and queries (materialised.chunk_plan)
# ------------------------------------------------------------------------------------------------

def _masked_scores(q_c, k_c, Tq: int, Tk: int, r0: int, r1: int) -> torch.Tensor:
    """S / sqrt(d) for queries r0 .. r1 - 1 and the keys they see (fp32 [Bc, Tc, keys]), -inf where
    the bottom-right causal mask hides a key: query i sees keys 0 .. Tk - Tq + i."""
    keys = k_c.shape[1]
    scores = bmm_fp32(q_c, k_c.transpose(1, 2)).mul_(1.0 / math.sqrt(q_c.shape[-1]))
    if r1 - r0 == 1:
        return scores  # one query, which sees every key of the chunk
    last_key = Tk - Tq + torch.arange(r0, r1, device=q_c.device).unsqueeze(1)  # [Tc, 1]
    hidden = torch.arange(keys, device=q_c.device) > last_key  # [Tc, keys]
    return scores.masked_fill_(hidden, float("-inf"))


def _dropout_scale(dropout_p: float) -> float:
    """Kept weights are scaled by 1 / (1 - p); with p = 1 nothing is kept and the scale is moot."""
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


@torch.library.custom_op("sharnn_fast::attention_scores_fwd", mutates_args=())
def attention_scores_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [Tq, B, d], k [Tk, B, d], v [Tk, B, dv] (one dtype, Tk >= Tq) -> (out [Tq, B, dv] in q's
    dtype, lse [B, Tq] fp32 (natural log), keep [B, Tq, Tk] bool, the dropout mask; [0] when
    dropout_p is 0)."""
    Tq, B, d = q.shape
    Tk, dv = k.shape[0], v.shape[-1]
    dtype, device = q.dtype, q.device
    out = new_output((Tq, B, dv), dtype, device)  # [Tq, B, dv]
    lse = new_output((B, Tq), torch.float32, device)  # [B, Tq]
    # Keys a chunk does not reach stay False: no query sees them, nothing reads them as kept.
    keep = torch.zeros((B, Tq, Tk) if dropout_p > 0.0 else (0,), dtype=torch.bool, device=device)
    qb, kb, vb, ob = batch_first(q, k, v, out)
    with autocast_off(device):
        plan = chunk_plan(B, Tq, Tk, d, dv, dtype, backward=False, score_bytes=SCORE_BYTES[False])
        for b0, b1, query_chunks in chunks(B, Tq, plan):
            for r0, r1 in query_chunks:
                keys = Tk - Tq + r1  # the keys the chunk's last query sees
                scores = _masked_scores(qb[b0:b1, r0:r1], kb[b0:b1, :keys], Tq, Tk, r0, r1)  # [Bc, Tc, keys]
                row_lse = torch.logsumexp(scores, dim=-1)  # [Bc, Tc]
                lse[b0:b1, r0:r1] = row_lse
                probs = scores.sub_(row_lse.unsqueeze(-1)).exp_()  # softmax, in place; 0 where masked
                if dropout_p > 0.0:
                    keep_c = torch.rand(probs.shape, device=device) >= dropout_p
                    keep[b0:b1, r0:r1, :keys] = keep_c
                    probs.mul_(keep_c).mul_(_dropout_scale(dropout_p))
                torch.bmm(probs.to(dtype), vb[b0:b1, :keys], out=ob[b0:b1, r0:r1])
    return out, lse, keep


@attention_scores_fwd.register_fake
def _(q, k, v, dropout_p):
    Tq, B = q.shape[0], q.shape[1]
    keep_shape = (B, Tq, k.shape[0]) if dropout_p > 0.0 else (0,)
    return (q.new_empty(Tq, B, v.shape[-1]), q.new_empty(B, Tq, dtype=torch.float32),
            q.new_empty(keep_shape, dtype=torch.bool))


@torch.library.custom_op("sharnn_fast::attention_scores_bwd", mutates_args=())
def attention_scores_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         lse: torch.Tensor, keep: torch.Tensor,
                         dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of attention_scores_fwd's out, given grad_out [Tq, B, dv] and the
    forward's lse and keep. Per chunk: P from the recomputed scores and lse; dP~ = dO V^T (fp32); the
    gradient reaching P, dP = dP~ * keep / (1 - p); delta = rowsum(P * dP); dS = P (dP - delta) / sqrt(d);
    dQ = dS K, dK = dS^T Q, dV = P~^T dO with P~ = P * keep / (1 - p) (products in the input dtype,
    dK and dV summed over query chunks in fp32)."""
    Tq, B, d = q.shape
    Tk, dv = k.shape[0], v.shape[-1]
    dtype, device = q.dtype, q.device
    dq = new_output(q.shape, dtype, device)  # [Tq, B, d]
    dk = new_output(k.shape, dtype, device)  # [Tk, B, d]
    dv_ = new_output(v.shape, dtype, device)  # [Tk, B, dv]
    qb, kb, vb, dob, dqb, dkb, dvb = batch_first(q, k, v, grad_out.to(dtype), dq, dk, dv_)
    scale = 1.0 / math.sqrt(d)

    def score_gradients(b0, b1, r0, r1, q_c, k_c, v_c, do_c):
        keys = k_c.shape[1]
        probs = _masked_scores(q_c, k_c, Tq, Tk, r0, r1)
        probs = probs.sub_(lse[b0:b1, r0:r1].unsqueeze(-1)).exp_()  # P [Bc, Tc, keys]
        dprobs = bmm_fp32(do_c, v_c.transpose(1, 2))  # dP~ [Bc, Tc, keys]
        if dropout_p > 0.0:
            keep_scaled = keep[b0:b1, r0:r1, :keys] * _dropout_scale(dropout_p)  # fp32
            dprobs.mul_(keep_scaled)  # dP
            dropped = (probs * keep_scaled).to(dtype)  # P~
            del keep_scaled
        else:
            dropped = probs.to(dtype)
        delta = (probs * dprobs).sum(-1, keepdim=True)  # [Bc, Tc, 1]
        return dprobs.sub_(delta).mul_(probs).mul_(scale).to(dtype), dropped  # dS, P~

    with autocast_off(device):
        plan = chunk_plan(B, Tq, Tk, d, dv, dtype, backward=True, score_bytes=SCORE_BYTES[True])
        backward_products(qb, kb, vb, dob, dqb, dkb, dvb, plan, score_gradients)
    return dq, dk, dv_


@attention_scores_bwd.register_fake
def _(grad_out, q, k, v, lse, keep, dropout_p):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, dropout_p = inputs
    _, lse, keep = output
    ctx.save_for_backward(q, k, v, lse, keep)
    ctx.dropout_p = dropout_p
    ctx.mark_non_differentiable(lse, keep)


def _backward(ctx, grad_out, _grad_lse, _grad_keep):
    q, k, v, lse, keep = ctx.saved_tensors
    dq, dk, dv = attention_scores_bwd(grad_out, q, k, v, lse, keep, ctx.dropout_p)
    return dq, dk, dv, None


attention_scores_fwd.register_autograd(_backward, setup_context=_setup_context)
