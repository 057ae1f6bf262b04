"""LSTM through PyTorch's own fused kernel: the one nn.LSTM calls (cuDNN on CUDA, oneDNN on CPU)."""
from __future__ import annotations

import torch


def lstm_torch(x, weight_ih, weight_hh, bias_ih, bias_hh, hx=None):
    _, B, _ = x.shape
    H = weight_hh.shape[1]
    if hx is None:
        zeros = x.new_zeros(1, B, H)  # [1, B, H]
        hx = (zeros, zeros)
    weights = (weight_ih, weight_hh, bias_ih, bias_hh)
    # `train` only decides whether cuDNN keeps what its backward needs (this LSTM has no dropout),
    # so ask for it exactly when a backward can follow: nn.LSTM ties it to module.training instead,
    # which breaks backward in eval mode.
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, *weights, *hx))
    y, h_n, c_n = torch.lstm(x, tuple(hx), weights, True, 1, 0.0, needs_grad, False, False)
    return y, (h_n, c_n)  # [T, B, H], ([1, B, H], [1, B, H])
