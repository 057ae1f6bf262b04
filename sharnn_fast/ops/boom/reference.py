"""The Boom feed-forward layer (shortcut form) in plain PyTorch: the ground truth.

    z = x W^T + b                          # [..., F]
    a = dropout(z * sigmoid(1.702 z))      # the sigmoid approximation of GELU
    y = a[..., 0:d] + a[..., d:2d] + ...   # [..., d]: F // d chunks summed, no second matrix
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gelu_sigmoid(z):
    return z * torch.sigmoid(1.702 * z)


def boom_reference(x, weight, bias, dropout_p=0.0, training=False):
    d = x.shape[-1]
    z = F.linear(x, weight, bias)  # [..., F]
    a = F.dropout(gelu_sigmoid(z), dropout_p, training)
    return a.unflatten(-1, (-1, d)).sum(-2)  # [..., d]
