"""LSTM through PyTorch's own fused kernel: the one nn.LSTM calls (cuDNN on CUDA, oneDNN or ATen's
own loop on CPU).

The inputs are cast to the compute dtype here and torch.lstm runs with autocast off, so every
tensor it sees has one dtype: under CPU autocast, torch.lstm would otherwise receive a mix, which
oneDNN rejects on many CPUs. Whether this CPU's torch.lstm runs a reduced-precision dtype at all is
probed once per dtype (:func:`cpu_lstm_failure`), so "auto" can fall back instead of crashing.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch

from .._dtypes import compute_dtype, no_autocast

_NOT_FLAT_WARNING = "RNN module weights are not part of single contiguous chunk of memory"
_PROBED_DTYPES = (torch.float16, torch.bfloat16)


def _torch_lstm(x, weights, hx, needs_grad: bool):
    # `train` only decides whether cuDNN keeps what its backward needs (this LSTM has no dropout),
    # so ask for it exactly when a backward can follow: nn.LSTM ties it to module.training instead,
    # which breaks backward in eval mode.
    args = (x, tuple(hx), tuple(weights), True, 1, 0.0, needs_grad, False, False)
    with no_autocast(x.device):
        if x.is_cuda and not torch.compiler.is_compiling():
            # cuDNN wants the four weights in one flat buffer (nn.LSTM's flatten_parameters); ours
            # are separate Parameters, so it copies them (a few microseconds a call) and warns.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_NOT_FLAT_WARNING)
                return torch.lstm(*args)
        return torch.lstm(*args)


def lstm_torch(x, weight_ih, weight_hh, bias_ih, bias_hh, hx=None):
    _, B, _ = x.shape
    H = weight_hh.shape[1]
    dtype = compute_dtype(x)
    x, *weights = (t.to(dtype) for t in (x, weight_ih, weight_hh, bias_ih, bias_hh))
    if hx is None:
        zeros = x.new_zeros(1, B, H)  # [1, B, H]
        hx = (zeros, zeros)
    hx = tuple(t.to(dtype) for t in hx)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights, *hx))
    y, h_n, c_n = _torch_lstm(x, weights, hx, needs_grad)
    return y, (h_n, c_n)  # [T, B, H], ([1, B, H], [1, B, H])


@functools.lru_cache(maxsize=None)
def cpu_lstm_failure(dtype: torch.dtype, needs_grad: bool) -> Optional[str]:
    """Why torch.lstm cannot run ``dtype`` on this CPU, or None. oneDNN's reduced-precision LSTM
    depends on the instruction set (e.g. bfloat16 needs more than AVX2 on some oneDNN versions), so
    it is tried once, on a tiny problem with fixed inputs (no random numbers drawn)."""
    T, B, H = 2, 1, 4
    x = torch.linspace(-1, 1, T * B * H).view(T, B, H).to(dtype)
    weights = [torch.linspace(-0.5, 0.5, 4 * H * H).view(4 * H, H).to(dtype) for _ in range(2)]
    weights += [torch.zeros(4 * H, dtype=dtype) for _ in range(2)]
    hx = (torch.zeros(1, B, H, dtype=dtype),) * 2
    try:
        with torch.enable_grad():
            for t in (x, *weights):
                t.requires_grad_(needs_grad)
            y, _, _ = _torch_lstm(x, weights, hx, needs_grad)
            if needs_grad:
                y.sum().backward()
    except RuntimeError as err:
        return (f"torch.lstm cannot run {dtype} on this CPU ({str(err).splitlines()[0]}); "
                "use backend='reference' or float32")
    return None


def why_not(x, weight_ih, weight_hh, bias_ih, bias_hh, hx=None) -> Optional[str]:
    dtype = compute_dtype(x)
    if x.device.type != "cpu" or dtype not in _PROBED_DTYPES or torch.compiler.is_compiling():
        return None
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x, weight_ih, weight_hh, bias_ih, bias_hh, *(hx or ())))
    return cpu_lstm_failure(dtype, needs_grad)


def twice_differentiable(x, *args) -> bool:
    """ATen's CPU LSTM in float32/float64 is differentiable twice (tested against the reference);
    cuDNN's and oneDNN's reduced-precision LSTMs have no double backward."""
    return x.device.type == "cpu" and compute_dtype(x) in (torch.float32, torch.float64)
