"""The "triton" implementation of ``ops.attention``: which of its two paths runs a call.

- The flash kernel (``triton_flash.py``) for heads narrower than ``materialised.WIDE_HEAD_MIN_D``
  (up to 256 wide), where the scores stay on chip.
- The materialised scores (``triton_wide.py``: cuBLAS products, fused Triton softmax) for wider
  heads such as the paper's d = 1024; see materialised.py for why.

Both take sequence-first q [Tq, B, d], k [Tk, B, d], v [Tk, B, dv] with Tk >= Tq, scale 1/sqrt(d),
the causal mask aligned to the end, and drop the same weights for the same seed
(``triton_common.py``). ``explain()`` names the path that ran and why.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...backend import Implementation, note_path
from .._kernels import compute_dtype, triton_why_not
from . import materialised, triton_wide
from .triton_flash import attention_fwd, attention_fwd_kernel


def describe_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wide: bool) -> str:
    """What explain() says about the path taken for these inputs (``wide``: the materialised
    path), and why."""
    Tq, B, d = q.shape
    if wide != materialised.uses_materialised_scores(d):
        why = "asked for by the caller (path=...)"
    else:
        why = f"head width d = {d} {'>=' if wide else '<'} WIDE_HEAD_MIN_D = {materialised.WIDE_HEAD_MIN_D}"
    if not wide:
        return f"flash kernel: {why}, the scores stay on chip"
    Tk, dv = k.shape[0], v.shape[-1]
    return (f"materialised scores: {why}; cuBLAS products and fused Triton softmax; "
            f"{materialised.describe_plan(B, Tq, Tk, d, dv, q.dtype)}")


def attention_triton(q, k, v, dropout_p=0.0, training=False, path: Optional[str] = None):
    """ops.attention's arguments -> [Tq, B, dv]. Under autocast, q, k, v are cast to its dtype.

    Heads of at least materialised.WIDE_HEAD_MIN_D take the materialised-scores path
    (triton_wide.py), narrower ones the flash kernel (triton_flash.py); ``path`` ("flash" or "wide")
    overrides the choice (benchmarks and tests). Raises ValueError for another ``path``."""
    dtype = compute_dtype(q)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    p = float(dropout_p) if training else 0.0
    seed = (torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device) if p > 0.0 else None)
    if path not in (None, "flash", "wide"):
        raise ValueError(f"path must be None, 'flash' or 'wide', got {path!r}")
    wide = materialised.uses_materialised_scores(q.shape[-1]) if path is None else path == "wide"
    note_path("attention", lambda: describe_path(q, k, v, wide))
    return (triton_wide.attention_wide_fwd if wide else attention_fwd)(q, k, v, p, seed)[0]


def why_not(q, k, v, dropout_p=0.0, training=False) -> Optional[str]:
    return triton_why_not("attention", q, attention_fwd_kernel)


IMPLEMENTATION = Implementation(run=attention_triton, why_not=why_not)
