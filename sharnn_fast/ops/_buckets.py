"""Shape buckets: the sizes an autotuned choice is keyed on (see :mod:`sharnn_fast.autotuning`).

Every sequence length, batch size and token count is rounded up to a power of two; every width
(hidden size, head width, Boom width) stays exact. So the growing attention memory of a training
run, or the last short segment of an epoch, reuses a choice made for a neighbouring size.
"""
from __future__ import annotations


def pow2(n: int) -> int:
    """n rounded up to a power of two (the bucket of a length, a batch or a token count); 1 for
    n <= 1."""
    return 1 << max(int(n) - 1, 0).bit_length()
