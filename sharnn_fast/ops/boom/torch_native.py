"""Boom with PyTorch's GEMM plus one hand-written autograd node for everything after it.

Autograd on the eager expression would keep several [N, F] tensors alive for backward (z, the
sigmoid, the product, the dropout mask); this node keeps only z (and the mask when training with
dropout) and recomputes the sigmoid in backward. Elementwise math runs in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_GELU_SCALE = 1.702


class GeluChunkSum(torch.autograd.Function):
    """y = sum over chunks of width d of keep * scale * z * sigmoid(1.702 z)."""

    @staticmethod
    def forward(ctx, z, d: int, keep, scale: float):
        zf = z.float()
        a = zf * torch.sigmoid(_GELU_SCALE * zf)  # [..., F]
        if keep is not None:
            a.mul_(keep).mul_(scale)
        ctx.save_for_backward(z, keep)
        ctx.d, ctx.scale = d, scale
        return a.unflatten(-1, (-1, d)).sum(-2).to(z.dtype)  # [..., d]

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        z, keep = ctx.saved_tensors
        zf = z.float()
        s = torch.sigmoid(_GELU_SCALE * zf)
        # d/dz [z s(1.702 z)] = s + 1.702 z s (1 - s)
        dz = (1.0 - s).mul_(zf).mul_(_GELU_SCALE).add_(1.0).mul_(s)  # [..., F]
        if keep is not None:
            dz.mul_(keep).mul_(ctx.scale)
        # Every chunk of a receives the same upstream gradient.
        dz = dz.unflatten(-1, (-1, ctx.d)).mul_(dy.float().unsqueeze(-2)).flatten(-2)
        return dz.to(z.dtype), None, None, None


def keep_mask(like, dropout_p: float):
    """A bool mask shaped like ``like``, each element True with probability 1 - dropout_p
    (to within 2**-16): 16 random bits per element compared with a threshold. On CPU this is about
    3x faster than bernoulli_, which dominated the Boom's time in training."""
    n = like.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device)
    bits = words.random_(-2**63, None).view(torch.int16)[:n]  # every bit uniform
    return (bits < round((1.0 - dropout_p) * 65536) - 32768).view(like.shape)


def boom_torch(x, weight, bias, dropout_p=0.0, training=False):
    z = F.linear(x, weight, bias)  # [..., F]
    keep, scale = None, 1.0
    if training and dropout_p > 0.0:
        keep = keep_mask(z, dropout_p)
        scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
    return GeluChunkSum.apply(z, x.shape[-1], keep, scale)
