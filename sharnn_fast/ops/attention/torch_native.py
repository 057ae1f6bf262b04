"""Attention through torch's scaled_dot_product_attention (flash, memory-efficient, cuDNN or math,
whichever SDPA picks for the device, dtype and head width)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def attention_torch(q, k, v, dropout_p=0.0, training=False):
    Tq, Tk = q.shape[0], k.shape[0]
    # [T, B, d] -> [B, 1 head, T, d] as a view: SDPA takes strided inputs.
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(1) for t in (q, k, v))
    p = dropout_p if training else 0.0
    if Tq == Tk:
        y = F.scaled_dot_product_attention(q4, k4, v4, dropout_p=p, is_causal=True)
    else:
        # is_causal aligns the mask to the top-left; a memory in front needs bottom-right.
        y = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=_bottom_right_causal_mask(Tq, Tk, q.device),
                                           dropout_p=p)
    return y.squeeze(1).transpose(0, 1)  # [Tq, B, dv]
