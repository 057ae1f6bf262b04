"""Argument checks shared by the public ops: each failure names the argument and what was expected."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def check_float_tensor(name: str, t, shape: Optional[Sequence[Optional[int]]] = None,
                       ndim: Optional[int] = None) -> torch.Tensor:
    """``t`` must be a floating-point tensor; ``shape`` entries of ``None`` match any size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        expected = f"[{', '.join('*' if s is None else str(s) for s in shape)}]" if shape else ""
        raise ValueError(f"{name} must have {ndim} dimensions {expected}, got shape {list(t.shape)}")
    if shape is not None:
        for axis, (want, got) in enumerate(zip(shape, t.shape)):
            if want is not None and want != got:
                expected = ", ".join("*" if s is None else str(s) for s in shape)
                raise ValueError(f"{name} must have shape [{expected}], got {list(t.shape)} "
                                 f"(dimension {axis} is {got}, expected {want})")
    return t


def check_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}")
    return next(iter(devices))


def check_same_dtype(device: torch.device, **tensors: Optional[torch.Tensor]) -> None:
    """Outside autocast, mixed dtypes would be silently promoted by some backends and rejected by
    others; insist on one dtype so every backend sees the same problem."""
    if torch.is_autocast_enabled(device.type):
        return
    present = {name: t for name, t in tensors.items() if t is not None}
    if len({t.dtype for t in present.values()}) > 1:
        got = ", ".join(f"{name} {t.dtype}" for name, t in present.items())
        raise TypeError(f"all tensors must have one dtype (or run under torch.autocast), got {got}")


def check_dropout(dropout_p) -> float:
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1], got {dropout_p!r}")
    return float(dropout_p)
