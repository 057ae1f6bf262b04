"""Attention through torch's scaled_dot_product_attention (flash, memory-efficient, cuDNN or math,
whichever SDPA picks for the device, dtype and head width)."""
from __future__ import annotations

import torch.nn.functional as F


def attention_torch(q, k, v, dropout_p=0.0, training=False):
    # Imported here: torch.nn.attention.bias pulls in torch._dynamo and triton (seconds).
    from torch.nn.attention.bias import causal_lower_right

    Tq, Tk = q.shape[0], k.shape[0]
    # [T, B, d] -> [B, 1 head, T, d] as a view: SDPA takes strided inputs.
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(1) for t in (q, k, v))
    p = dropout_p if training else 0.0
    if Tq == Tk:
        y = F.scaled_dot_product_attention(q4, k4, v4, dropout_p=p, is_causal=True)
    else:
        # is_causal aligns the mask to the top-left; a memory in front needs bottom-right.
        y = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=causal_lower_right(Tq, Tk),
                                           dropout_p=p)
    return y.squeeze(1).transpose(0, 1)  # [Tq, B, dv]
