"""LSTM through PyTorch's own fused kernel: the one nn.LSTM calls (cuDNN on CUDA, oneDNN on CPU)."""
from __future__ import annotations

import warnings

import torch

_NOT_FLAT_WARNING = "RNN module weights are not part of single contiguous chunk of memory"


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
    args = (x, tuple(hx), weights, True, 1, 0.0, needs_grad, False, False)
    if x.is_cuda and not torch.compiler.is_compiling():
        # cuDNN wants the four weights in one flat buffer (nn.LSTM's flatten_parameters); ours are
        # separate Parameters, so it copies them (a few microseconds, once per call) and warns.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NOT_FLAT_WARNING)
            y, h_n, c_n = torch.lstm(*args)
    else:
        y, h_n, c_n = torch.lstm(*args)
    return y, (h_n, c_n)  # [T, B, H], ([1, B, H], [1, B, H])
