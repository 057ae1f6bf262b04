"""``ops.boom``: the Boom feed-forward layer, d -> F -> d by summing F // d chunks."""
from __future__ import annotations

from ... import backend as _backend
from .._buckets import pow2
from .._checks import check_dropout, check_float_tensor, check_same_device, check_same_dtype
from .._dtypes import cast_outputs, compute_dtype
from .reference import boom_reference
from .torch_native import boom_torch

IMPLEMENTATIONS = {
    "reference": _backend.Implementation(boom_reference, double_backward=True),
    "torch": _backend.Implementation(boom_torch, double_backward=True),
    "triton": _backend.LazyImplementation(__name__ + ".triton", _backend.TRITON_HINT),
}


def boom(x, weight, bias, *, dropout_p=0.0, training=False, backend=None):
    """y = sum of the F // d chunks of dropout(GELU(x W^T + b)), GELU(z) = z * sigmoid(1.702 z).

    Args:
        x: [..., d] (any leading shape); weight: [F, d] with F a multiple of d; bias: [F] or None.
        dropout_p: dropout on the F-wide activation, applied only when ``training``.
        backend: ``"reference"``, ``"torch"``, ``"auto"``, ... or ``None`` for the process default.

    Returns:
        [..., d], in the compute dtype: the autocast dtype under autocast (float64 stays float64),
        else the inputs' dtype. Every backend returns the same dtype; the reference computes in at
        least float32 internally. Gradients come back in each input's own dtype.

    Raises:
        TypeError / ValueError: a bad argument (named in the message).
        BackendUnavailableError: an explicitly requested backend cannot run these inputs.
        RuntimeError: in a higher-order gradient (``create_graph=True``) through a backend whose
            backward is not differentiable ("triton"); "reference" and "torch" support it.
    """
    check_float_tensor("x", x)
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty tensor [..., d], got shape {list(x.shape)}")
    d = x.shape[-1]
    check_float_tensor("weight", weight, shape=(None, d))
    F = weight.shape[0]
    if F == 0 or F % d != 0:
        raise ValueError(f"weight must have a positive multiple of d={d} rows (x.shape[-1]), got "
                         f"{F}: Boom sums the F // d chunks of width d")
    if bias is not None:
        check_float_tensor("bias", bias, shape=(F,))
    dropout_p = check_dropout(dropout_p)
    device = check_same_device(x=x, weight=weight, bias=bias)
    check_same_dtype(device, x=x, weight=weight, bias=bias)
    dtype = compute_dtype(x)
    tuning = _backend.Tuning(bucket=lambda: (pow2(x.numel() // d), d, F, bias is not None), dtype=dtype,
                             dropout=training and dropout_p > 0, deterministic=_backend.without_dropout)
    y = _backend.run("boom", backend, IMPLEMENTATIONS, device, x, weight, bias, dropout_p, training,
                     tuning=tuning)
    return cast_outputs(y, dtype)

