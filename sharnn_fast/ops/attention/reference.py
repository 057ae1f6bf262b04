"""Single-head causal attention in plain PyTorch: the ground truth for every other backend.

Sequence-first: q [Tq, B, d], k [Tk, B, d], v [Tk, B, dv] with Tk >= Tq. The causal mask is aligned
to the end ("bottom-right"): the keys are a memory of Tk - Tq earlier positions followed by the Tq
current ones, so query i sees keys 0 .. Tk - Tq + i.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention_reference(q, k, v, dropout_p=0.0, training=False):
    Tq, Tk, d = q.shape[0], k.shape[0], q.shape[-1]
    scores = torch.einsum("qbd,kbd->bqk", q, k) / math.sqrt(d)  # [B, Tq, Tk]
    future = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).triu(Tk - Tq + 1)  # [Tq, Tk]
    scores = scores.masked_fill(future, float("-inf"))
    # Softmax in at least float32, so the reduced-precision reference is as good as it can be:
    # other backends are held to it.
    softmax_dtype = torch.promote_types(scores.dtype, torch.float32)
    weights = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(v.dtype)  # [B, Tq, Tk]
    weights = F.dropout(weights, dropout_p, training)
    return torch.einsum("bqk,kbd->qbd", weights, v)  # [Tq, B, dv]
