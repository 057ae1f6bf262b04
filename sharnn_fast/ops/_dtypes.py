"""The dtype contract every implementation of every op keeps (what ``ops.lstm``, ``ops.attention``
and ``ops.boom`` document), in one place.

- The *compute dtype* of a call is the autocast dtype when autocast is on for the inputs' device
  (as for the GEMMs around the op), else the dtype of the inputs. float64 stays float64: autocast
  leaves it alone.
- Every output of an op (``y``, and the LSTM's ``h_n`` and ``c_n``) is in the compute dtype, whatever
  the backend.
- Gradients come back in the dtype of the tensor they belong to (autograd casts them).
- The reference implementations round their inputs to the compute dtype, as autocast would, and
  then compute in at least float32 (:func:`math_dtype`), so they are the best a kernel taking those
  inputs can do: the ground truth every other backend is held to.

"At least float32" (float16 and bfloat16 widen to float32, float64 stays float64) is one rule,
written once: :func:`math_dtype` for a dtype, :func:`at_least_float32` for a tensor.
"""
from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an op runs in and returns: under autocast for x's device, the autocast dtype
    (float64 stays float64, as autocast leaves it), else x's own."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the references compute in: at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in :func:`math_dtype` of its dtype: float16 and bfloat16 widened to float32, float32
    and float64 as they are (no copy). An autograd operation: the gradient comes back in t's dtype."""
    return t.to(math_dtype(t.dtype))


def reference_operands(dtype: torch.dtype, *tensors):
    """``tensors`` rounded to ``dtype`` (what autocast hands a kernel), then widened to
    ``math_dtype(dtype)`` for the arithmetic. ``None`` passes through. Both casts are autograd
    operations, so gradients reach the originals in their own dtypes."""
    return tuple(None if t is None else at_least_float32(t.to(dtype)) for t in tensors)


def no_autocast(device: torch.device):
    """A context in which autocast does not recast the references' float32 arithmetic."""
    return torch.autocast(device.type, enabled=False)


def cast_outputs(outputs, dtype: torch.dtype):
    """``outputs`` (a tensor or nested tuples of tensors) with every tensor in ``dtype``; a no-op
    for tensors that already are."""
    if isinstance(outputs, torch.Tensor):
        return outputs if outputs.dtype == dtype else outputs.to(dtype)
    return type(outputs)(cast_outputs(o, dtype) for o in outputs)
