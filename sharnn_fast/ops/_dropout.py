"""Dropout masks drawn fast: 16 random bits per element compared with a threshold.

On CPU this is about 3x faster than ``bernoulli_`` and than the uniform draw Inductor compiles for
``rand_like`` (measured: 4 ms for 2M elements against 10-13 ms, 2-core CPU). It is one custom op,
``sharnn_fast::keep_mask``, so that torch.compile calls it instead of tracing it (Dynamo cannot
trace ``random_`` over the full int64 range). It draws from torch's default generator, so
``torch.manual_seed`` reproduces it; tagged ``nondeterministic_seeded``, so the compiler never
recomputes it for the backward (which would draw a different mask).
"""
from __future__ import annotations

import torch


@torch.library.custom_op("sharnn_fast::keep_mask", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def keep_mask(like: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """A bool mask shaped like ``like`` (contiguous, on its device), each element True with
    probability 1 - dropout_p, to within 2**-16."""
    n = like.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device)
    bits = words.random_(-2**63, None).view(torch.int16)[:n]  # every bit uniform
    return (bits < round((1.0 - dropout_p) * 65536) - 32768).reshape(like.shape)


@keep_mask.register_fake
def _(like, dropout_p):
    return like.new_empty(like.shape, dtype=torch.bool)


def keep_scale(dropout_p: float) -> float:
    """What kept elements are multiplied by: 1 / (1 - p), and 0 for p = 1 (nothing is kept)."""
    return 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
