"""Boom with PyTorch's GEMM plus one hand-written autograd node for everything after it.

Autograd on the eager expression would keep several [N, F] tensors alive for backward (z, the
sigmoid, the product, the dropout mask); this node keeps only z (and the mask when training with
dropout) and recomputes the sigmoid in backward. Elementwise math runs in at least float32
(float64 inputs stay float64).

Higher-order gradients are exact: when a graph of the backward is being built
(``create_graph=True``), the backward runs as ordinary differentiable operations on the saved z, so
autograd differentiates it again; otherwise it runs in place, allocating as little as possible.

Under torch.compile the same math runs as plain operations (the compiler fuses them and derives
the backward). The dropout mask comes from ``ops._dropout.keep_mask``, eager or compiled.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._dropout import keep_mask, keep_scale
from .._dtypes import at_least_float32

_GELU_SCALE = 1.702


def _gelu(z):
    """z * sigmoid(1.702 z), the sigmoid approximation of GELU."""
    return z * torch.sigmoid(_GELU_SCALE * z)


def _gelu_grad(z, in_place: bool):
    """d/dz [z s(1.702 z)] = s + 1.702 z s (1 - s), with s = sigmoid(1.702 z)."""
    s = torch.sigmoid(_GELU_SCALE * z)
    if in_place:
        return (1.0 - s).mul_(z).mul_(_GELU_SCALE).add_(1.0).mul_(s)
    return s * (1.0 + _GELU_SCALE * z * (1.0 - s))


class GeluChunkSum(torch.autograd.Function):
    """y = sum over chunks of width d of keep * scale * z * sigmoid(1.702 z)."""

    @staticmethod
    def forward(ctx, z, d: int, keep, scale: float):
        a = _gelu(at_least_float32(z))  # [..., F]
        if keep is not None:
            a.mul_(keep).mul_(scale)
        ctx.save_for_backward(z, keep)
        ctx.d, ctx.scale = d, scale
        return a.unflatten(-1, (-1, d)).sum(-2).to(z.dtype)  # [..., d]

    @staticmethod
    def backward(ctx, dy):
        z, keep = ctx.saved_tensors
        # Grad mode is on here exactly when the caller asked for create_graph=True.
        in_place = not torch.is_grad_enabled()
        zf = at_least_float32(z)
        dz = _gelu_grad(zf, in_place)  # [..., F]
        if keep is not None:
            dz = dz.mul_(keep).mul_(ctx.scale) if in_place else dz * keep * ctx.scale
        # Every chunk of a receives the same upstream gradient.
        dy_chunks = dy.to(zf.dtype).unsqueeze(-2)  # [..., 1, d]
        dz = dz.unflatten(-1, (-1, ctx.d))  # [..., F // d, d]
        dz = dz.mul_(dy_chunks) if in_place else dz * dy_chunks
        return dz.flatten(-2).to(z.dtype), None, None, None


def boom_torch(x, weight, bias, dropout_p=0.0, training=False):
    z = F.linear(x, weight, bias)  # [..., F]
    keep, scale = None, 1.0
    if training and dropout_p > 0.0:
        keep, scale = keep_mask(z, dropout_p), keep_scale(dropout_p)
    if torch.compiler.is_compiling():
        # Plain operations: the compiler fuses them and differentiates them itself, and an
        # autograd.Function with symbolic sizes fails in Dynamo (torch 2.13).
        a = _gelu(at_least_float32(z))  # [..., F]
        if keep is not None:
            a = a * keep * scale
        return a.unflatten(-1, (-1, x.shape[-1])).sum(-2).to(z.dtype)  # [..., d]
    return GeluChunkSum.apply(z, x.shape[-1], keep, scale)
