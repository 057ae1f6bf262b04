"""What the triton backend's two attention paths share: the flash kernel (``triton_flash.py``) and
the materialised-scores path for wide heads (``triton_wide.py``). Both take sequence-first
q [Tq, B, d], k [Tk, B, d], v [Tk, B, dv] with Tk >= Tq, scale 1/sqrt(d), and the causal mask aligned
to the end (query i sees keys 0 .. Tk - Tq + i).

- Dropout on the weights: keep(b, i, j) = philox(seed, (b * Tq + i) * Tk + j) >= p
  (:func:`dropout_keep`), so both paths drop the same weights for the same seed, whatever their
  tiling, and a backward regenerates the mask from the seed instead of storing it. Kept weights are
  scaled by :func:`dropout_scale`.
- Softmax in base 2: scores are scaled by LOG2_E / sqrt(d), and the saved log-sum-exp is base 2.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2_E = 1.4426950408889634


def check_lengths(Tq: int, Tk: int) -> None:
    """Raises ValueError unless Tk >= Tq."""
    if Tk < Tq:
        raise ValueError(f"attention needs at least as many keys as queries (Tk >= Tq), got Tk={Tk}, Tq={Tq}")


def dropout_scale(dropout_p: float) -> float:
    """Kept weights are scaled by 1 / (1 - p); with p = 1 nothing is kept and the scale is moot."""
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


@triton.jit
def dropout_keep(seed, batch, Tq, Tk, query, key, dropout_p):
    """Keep mask of the weights (batch, query, key); query and key broadcast against each other.
    The same (batch, query, key) gives the same bit in every kernel, whatever its tiling."""
    rng_offset = (batch.to(tl.int64) * Tq + query) * Tk + key
    return tl.rand(seed, rng_offset) >= dropout_p
