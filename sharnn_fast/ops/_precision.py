"""The precision of the Triton kernels' matrix products (tl.dot), one rule for every kernel.

float32 inputs: "tf32x3", three tf32 tensor-core products per dot (each operand split into a tf32
high part and a tf32 remainder; only the product of the two remainders is dropped), so a dot is
about as accurate as a float32 one, yet still runs on the tensor cores. Triton's own default for a
float32 dot is a single tf32 product ("tf32", about 1e-3 relative error per product), which would
make results depend on that default. float16 and bfloat16 inputs multiply natively with float32
accumulation whatever this says. Under TRITON_INTERPRET=1 (CPU) the interpreter multiplies in
float32 (numpy) whatever this says.

README.md, "Precision of float32 inputs", gives the same for every backend.
"""
from __future__ import annotations

import torch


def triton_dot_precision(dtype: torch.dtype) -> str:
    """The ``input_precision`` of every tl.dot for inputs of ``dtype``."""
    return "tf32x3" if dtype == torch.float32 else "tf32"
