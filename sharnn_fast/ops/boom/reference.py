"""The Boom feed-forward layer (shortcut form) in plain PyTorch: the ground truth.

    z = x W^T + b                          # [..., F]
    a = dropout(z * sigmoid(1.702 z))      # the sigmoid approximation of GELU
    y = a[..., 0:d] + a[..., d:2d] + ...   # [..., d]: F // d chunks summed, no second matrix

The inputs are rounded to the compute dtype (see ``ops/_dtypes.py``), then everything runs in at
least float32; only the result is rounded back. Differentiable to any order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._dtypes import compute_dtype, no_autocast, reference_operands


def gelu_sigmoid(z):
    return z * torch.sigmoid(1.702 * z)


def boom_reference(x, weight, bias, dropout_p=0.0, training=False):
    d, dtype = x.shape[-1], compute_dtype(x)
    with no_autocast(x.device):
        x, weight, bias = reference_operands(dtype, x, weight, bias)
        z = F.linear(x, weight, bias)  # [..., F]
        a = F.dropout(gelu_sigmoid(z), dropout_p, training)
        return a.unflatten(-1, (-1, d)).sum(-2).to(dtype)  # [..., d]
