"""``ops.lstm``: one LSTM layer over a whole sequence, sequence-first like nn.LSTM."""
from __future__ import annotations

from ... import backend as _backend
from .._buckets import pow2
from .._checks import check_float_tensor, check_same_device, check_same_dtype
from .._dtypes import cast_outputs, compute_dtype
from . import torch_native
from .reference import lstm_reference

IMPLEMENTATIONS = {
    "reference": _backend.Implementation(lstm_reference, double_backward=True),
    "torch": _backend.Implementation(torch_native.lstm_torch, why_not=torch_native.why_not,
                                     double_backward=torch_native.twice_differentiable),
    "triton": _backend.LazyImplementation(__name__ + ".triton", _backend.TRITON_HINT),
    "cuda": _backend.LazyImplementation(__name__ + ".cuda", _backend.CUDA_HINT),
}


def lstm(x, weight_ih, weight_hh, bias_ih, bias_hh, hx=None, *, backend=None):
    """Run one LSTM layer.

    Args:
        x: [T, B, I] input sequence.
        weight_ih: [4H, I], weight_hh: [4H, H], bias_ih: [4H], bias_hh: [4H], in nn.LSTM's layout
            (gate order i, f, g, o).
        hx: ``(h0, c0)``, each [1, B, H], or ``None`` for zeros.
        backend: ``"reference"``, ``"torch"``, ``"auto"``, ... or ``None`` for the process default.

    Returns:
        ``(y, (h_n, c_n))``: y [T, B, H], h_n and c_n [1, B, H], all three in the compute dtype: the
        autocast dtype under autocast (float64 stays float64), else the inputs' dtype, whatever the
        backend (as nn.LSTM under autocast). The reference computes the gates, the cell update and
        the carried state in at least float32. Gradients come back in each input's own dtype. NaN
        in any input propagates to the outputs; it is not checked for, since that would
        synchronise with the device.

    Raises:
        TypeError / ValueError: a bad argument (named in the message).
        BackendUnavailableError: an explicitly requested backend cannot run these inputs (e.g.
            "torch" in a reduced precision that this CPU's oneDNN cannot run).
        RuntimeError: in a higher-order gradient (``create_graph=True``) through a backend whose
            backward is not differentiable ("triton", "cuda", and "torch" except on CPU in
            float32/float64); "reference" supports it everywhere.
    """
    check_float_tensor("x", x, ndim=3)
    T, B, I = x.shape
    if T == 0 or B == 0:
        raise ValueError(f"x must have at least one time step and one sequence, got shape {list(x.shape)}")
    check_float_tensor("weight_hh", weight_hh, ndim=2)
    H = weight_hh.shape[1]
    check_float_tensor("weight_hh", weight_hh, shape=(4 * H, H))
    check_float_tensor("weight_ih", weight_ih, shape=(4 * H, I))
    check_float_tensor("bias_ih", bias_ih, shape=(4 * H,))
    check_float_tensor("bias_hh", bias_hh, shape=(4 * H,))
    h0 = c0 = None
    if hx is not None:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f"hx must be None or a pair (h0, c0), got {type(hx).__name__}")
        h0 = check_float_tensor("hx[0] (h0)", hx[0], shape=(1, B, H))
        c0 = check_float_tensor("hx[1] (c0)", hx[1], shape=(1, B, H))
    device = check_same_device(x=x, weight_ih=weight_ih, weight_hh=weight_hh, bias_ih=bias_ih,
                               bias_hh=bias_hh, h0=h0, c0=c0)
    check_same_dtype(device, x=x, weight_ih=weight_ih, weight_hh=weight_hh, bias_ih=bias_ih,
                     bias_hh=bias_hh, h0=h0, c0=c0)
    dtype = compute_dtype(x)
    # B % 8: where it is not 0, cuDNN never takes its persistent algorithm (backend.cudnn_persistent_lstm),
    # so a choice measured at B 16 must not be reused at B 12
    tuning = _backend.Tuning(bucket=lambda: (pow2(T), pow2(B), B % 8 == 0, I, H, hx is not None), dtype=dtype)
    out = _backend.run("lstm", backend, IMPLEMENTATIONS, device,
                       x, weight_ih, weight_hh, bias_ih, bias_hh, hx, tuning=tuning)
    return cast_outputs(out, dtype)
