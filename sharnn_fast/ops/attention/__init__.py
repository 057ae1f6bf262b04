"""``ops.attention``: single-head causal attention with an optional memory in front of the keys."""
from __future__ import annotations

from ... import backend as _backend
from .._buckets import pow2
from .._checks import check_dropout, check_float_tensor, check_same_device, check_same_dtype
from .._dtypes import cast_outputs, compute_dtype
from .reference import attention_reference
from .torch_native import attention_torch

IMPLEMENTATIONS = {
    "reference": _backend.Implementation(attention_reference, double_backward=True),
    # SDPA's fused kernels (flash, memory-efficient, and the CPU flash kernel) have no double backward.
    "torch": _backend.Implementation(attention_torch),
    "triton": _backend.LazyImplementation(__name__ + ".triton", _backend.TRITON_HINT),
}


def attention(q, k, v, *, dropout_p=0.0, training=False, backend=None):
    """softmax(q k^T / sqrt(d) + causal mask) v, with dropout on the weights when training.

    Args:
        q: [Tq, B, d] queries; k: [Tk, B, d] keys; v: [Tk, B, dv] values, Tk >= Tq. The mask is
            aligned to the end: query i sees keys 0 .. Tk - Tq + i (the first Tk - Tq keys are a
            memory of earlier positions).
        dropout_p: dropout on the attention weights, applied only when ``training``.
        backend: ``"reference"``, ``"torch"``, ``"auto"``, ... or ``None`` for the process default.

    Returns:
        [Tq, B, dv], in the compute dtype: the autocast dtype under autocast (float64 stays
        float64), else the inputs' dtype. Every backend returns the same dtype; the reference
        computes scores and softmax in at least float32. Gradients come back in each input's dtype.

    Raises:
        TypeError / ValueError: a bad argument (named in the message).
        BackendUnavailableError: an explicitly requested backend cannot run these inputs.
        RuntimeError: in a higher-order gradient (``create_graph=True``) through a backend whose
            backward is not differentiable ("torch", "triton"); "reference" supports it.
    """
    check_float_tensor("q", q, ndim=3)
    Tq, B, d = q.shape
    if Tq == 0 or B == 0 or d == 0:
        raise ValueError(f"q must be non-empty [Tq, B, d], got shape {list(q.shape)}")
    check_float_tensor("k", k, shape=(None, B, d))
    Tk = k.shape[0]
    if Tk < Tq:
        raise ValueError(f"k must have at least as many positions as q (Tk >= Tq), got Tk={Tk}, Tq={Tq}")
    check_float_tensor("v", v, shape=(Tk, B, None))
    dropout_p = check_dropout(dropout_p)
    device = check_same_device(q=q, k=k, v=v)
    check_same_dtype(device, q=q, k=k, v=v)
    dtype = compute_dtype(q)
    tuning = _backend.Tuning(bucket=lambda: (pow2(Tq), pow2(Tk), pow2(B), d, v.shape[-1]), dtype=dtype,
                             dropout=training and dropout_p > 0, deterministic=_backend.without_dropout)
    y = _backend.run("attention", backend, IMPLEMENTATIONS, device, q, k, v, dropout_p, training,
                     tuning=tuning)
    return cast_outputs(y, dtype)

