"""Single-head causal attention in plain PyTorch: the ground truth for every other backend.

Sequence-first: q [Tq, B, d], k [Tk, B, d], v [Tk, B, dv] with Tk >= Tq. The causal mask is aligned
to the end ("bottom-right"): the keys are a memory of Tk - Tq earlier positions followed by the Tq
current ones, so query i sees keys 0 .. Tk - Tq + i.

The inputs are rounded to the compute dtype (see ``ops/_dtypes.py``); the scores, the softmax, the
dropout and the weighted sum then run in at least float32 (fp16 scores overflow long before the
softmax would), and only the result is rounded back. Differentiable to any order.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._dtypes import compute_dtype, no_autocast, reference_operands


def attention_reference(q, k, v, dropout_p=0.0, training=False):
    Tq, Tk, d = q.shape[0], k.shape[0], q.shape[-1]
    dtype = compute_dtype(q)
    with no_autocast(q.device):
        q, k, v = reference_operands(dtype, q, k, v)
        scores = torch.einsum("qbd,kbd->bqk", q, k) / math.sqrt(d)  # [B, Tq, Tk]
        future = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).triu(Tk - Tq + 1)  # [Tq, Tk]
        weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)  # [B, Tq, Tk]
        weights = F.dropout(weights, dropout_p, training)
        return torch.einsum("bqk,kbd->qbd", weights, v).to(dtype)  # [Tq, B, dv]
