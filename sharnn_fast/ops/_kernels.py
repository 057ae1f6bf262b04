"""What the kernel implementations (triton*.py, cuda.py, the materialised attention paths) share:
the dtype they run in under autocast, the device checks of a Triton backend, the allocator of the
buffers a kernel fills, and :func:`interpreted`, the one test of whether Triton's interpreter runs a
kernel. Not an implementation itself.

Every Triton kernel module builds its launch configuration the same way: named tuning constants
(``GPU_CONFIG``, ``GPU_CONFIG_FP32``, ``INTERPRETER_CONFIG`` or ``GPU_MAX_*`` / ``INTERPRETER_*``
limits) in one place at its top, and one function ``launch_config(..., interpreter)`` that turns
them into the kernel's keyword arguments (its ``BLOCK_*`` sizes and the launch options num_warps,
num_stages), called by the launchers with ``interpreted(kernel)`` and passed on as ``**config``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ._dtypes import compute_dtype  # noqa: F401  (the kernels import it from here)

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Switched on by the tests (tests/ops/conftest.py): every buffer from new_output then starts as NaN,
# so an element that no kernel writes (or that one reads before another block wrote it) shows up in
# the comparison with the reference instead of passing by luck.
FILL_OUTPUTS_WITH_NAN = False


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A fresh buffer of ``shape`` (a tuple or torch.Size) that a kernel must fill completely:
    uninitialised, or all NaN while FILL_OUTPUTS_WITH_NAN is set. Buffers a kernel fills only in
    part, or accumulates into, are not allocated here."""
    if FILL_OUTPUTS_WITH_NAN:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def interpreted(kernel) -> bool:
    """Whether ``kernel`` and Triton's own library (tl.zeros, tl.sum, ...) were defined with
    TRITON_INTERPRET=1: Triton reads it when a function is decorated, not when it is called."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(kernel, InterpretedFunction) and isinstance(tl.zeros, InterpretedFunction)


def triton_why_not(what: str, x: torch.Tensor, kernel) -> Optional[str]:
    """Why the Triton kernels of ``what`` cannot take ``x`` (device, interpreter, dtype), or None."""
    device, dtype = x.device, compute_dtype(x)
    if dtype not in KERNEL_DTYPES:
        return (f"the triton {what} supports float32, float16 and bfloat16, got {dtype}; "
                "use backend='torch' or backend='reference'")
    if device.type == "cuda":
        return None
    if device.type != "cpu":
        return f"Triton kernels run on CUDA tensors; got {device.type}; use backend='torch'"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return ("Triton kernels run on CUDA tensors; got cpu (TRITON_INTERPRET=1 runs them on CPU, "
                "for tests); use backend='torch' on CPU")
    if not interpreted(kernel):
        return ("the Triton kernels were defined for a GPU: TRITON_INTERPRET=1 must be set before "
                "triton is first imported (torch._dynamo and sharnn_fast import it) to run them on CPU")
    if dtype == torch.bfloat16:
        return ("Triton's interpreter (TRITON_INTERPRET=1, CPU) has no bfloat16; use float32 or float16, "
                "a CUDA GPU, or backend='torch'")
    return None
