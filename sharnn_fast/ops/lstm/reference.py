"""LSTM, step by step in plain PyTorch: the ground truth for every other backend.

Gate order i, f, g, o and weight layout as nn.LSTM:
    gates_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh          # [B, 4H]
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(c_t)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lstm_reference(x, weight_ih, weight_hh, bias_ih, bias_hh, hx=None):
    T, B, _ = x.shape
    H = weight_hh.shape[1]
    if hx is None:
        h = x.new_zeros(B, H)  # [B, H]
        c = x.new_zeros(B, H)  # [B, H]
    else:
        h, c = hx[0][0], hx[1][0]
    # The input projection does not depend on the recurrence: one GEMM for all steps.
    x_proj = F.linear(x, weight_ih, bias_ih + bias_hh)  # [T, B, 4H]
    ys = []
    for t in range(T):
        gates = x_proj[t] + F.linear(h, weight_hh)  # [B, 4H]
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        ys.append(h)
    return torch.stack(ys), (h.unsqueeze(0), c.unsqueeze(0))  # [T, B, H], ([1, B, H], [1, B, H])
