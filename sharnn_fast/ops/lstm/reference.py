"""LSTM, step by step in plain PyTorch: the ground truth for every other backend.

Gate order i, f, g, o and weight layout as nn.LSTM:
    gates_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh          # [B, 4H]
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(c_t)

The inputs are rounded to the compute dtype (see ``ops/_dtypes.py``); the gates, the cell update and
the carried h and c are then computed in at least float32, and only y, h_n and c_n are rounded back.
Differentiable to any order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._dtypes import compute_dtype, no_autocast, reference_operands


def lstm_reference(x, weight_ih, weight_hh, bias_ih, bias_hh, hx=None):
    T, B, _ = x.shape
    H = weight_hh.shape[1]
    dtype = compute_dtype(x)
    h0, c0 = (None, None) if hx is None else (hx[0][0], hx[1][0])
    with no_autocast(x.device):
        x, weight_ih, weight_hh, bias_ih, bias_hh, h, c = reference_operands(
            dtype, x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0)
        if h is None:
            h = c = x.new_zeros(B, H)  # [B, H]
        # The input projection does not depend on the recurrence: one GEMM for all steps.
        x_proj = F.linear(x, weight_ih, bias_ih + bias_hh)  # [T, B, 4H]
        ys = []
        for t in range(T):
            gates = x_proj[t] + F.linear(h, weight_hh)  # [B, 4H]
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            ys.append(h)
        y = torch.stack(ys).to(dtype)  # [T, B, H]
        return y, (h.unsqueeze(0).to(dtype), c.unsqueeze(0).to(dtype))  # ([1, B, H], [1, B, H])
