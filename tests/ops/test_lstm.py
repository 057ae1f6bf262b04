import pytest
import torch
import torch.nn as nn

from sharnn_fast import ops
from sharnn_fast.ops.lstm.reference import lstm_reference
from tolerances import (CUDNN_BF16_SLACK, REDUCED_SLACK, assert_all_close, compare_in_reduced_precision,
                        fp32_tolerance, outputs_and_grads)

# (T, B, I, H): single step, batch of one, odd lengths and batches, widths not powers of two.
SHAPES = [(1, 1, 8, 8), (1, 3, 80, 96), (37, 3, 96, 80), (5, 1, 80, 80)]


def lstm_inputs(T, B, I, H, device="cpu", dtype=torch.float32, with_state=True):
    """Fresh random inputs at the scale nn.LSTM initialises to."""
    k = H ** -0.5

    def u(*shape):
        return torch.empty(*shape, device=device, dtype=dtype).uniform_(-k, k)

    inputs = dict(x=torch.randn(T, B, I, device=device, dtype=dtype),
                  weight_ih=u(4 * H, I), weight_hh=u(4 * H, H), bias_ih=u(4 * H), bias_hh=u(4 * H))
    if with_state:
        inputs.update(h0=0.5 * torch.randn(1, B, H, device=device, dtype=dtype),
                      c0=0.5 * torch.randn(1, B, H, device=device, dtype=dtype))
    return inputs


def run_lstm(backend):
    def fn(x, weight_ih, weight_hh, bias_ih, bias_hh, h0=None, c0=None):
        hx = None if h0 is None else (h0, c0)
        return ops.lstm(x, weight_ih, weight_hh, bias_ih, bias_hh, hx, backend=backend)
    return fn


@pytest.mark.parametrize("with_state", [True, False])
def test_reference_gradcheck(with_state):
    inputs = lstm_inputs(4, 2, 3, 5, dtype=torch.float64, with_state=with_state)
    names = list(inputs)
    leaves = [inputs[n].requires_grad_(True) for n in names]
    fn = run_lstm("reference")

    def flat(*args):
        y, (h, c) = fn(**dict(zip(names, args)))
        return y, h, c
    assert torch.autograd.gradcheck(flat, leaves)


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_nn_lstm(shape):
    T, B, I, H = shape
    inputs = lstm_inputs(T, B, I, H)
    module = nn.LSTM(I, H)

    def nn_lstm(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0):
        params = dict(weight_ih_l0=weight_ih, weight_hh_l0=weight_hh, bias_ih_l0=bias_ih, bias_hh_l0=bias_hh)
        return torch.func.functional_call(module, params, (x, (h0, c0)))
    assert_all_close(outputs_and_grads(run_lstm("reference"), inputs),
                     outputs_and_grads(nn_lstm, inputs), what="reference vs nn.LSTM")


@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_matches_reference(shape, with_state, device):
    inputs = lstm_inputs(*shape, device=device, with_state=with_state)
    tolerance = fp32_tolerance(device)
    assert_all_close(outputs_and_grads(run_lstm("torch"), inputs),
                     outputs_and_grads(run_lstm("reference"), inputs), tolerance, what="torch lstm")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_reduced_precision_on_gpu(dtype):
    slack = CUDNN_BF16_SLACK if dtype == torch.bfloat16 else REDUCED_SLACK
    compare_in_reduced_precision(run_lstm("torch"), run_lstm("reference"),
                                 lstm_inputs(37, 3, 96, 80, device="cuda"), dtype, slack=slack)


def test_nan_input_propagates_without_crash():
    inputs = lstm_inputs(3, 2, 8, 8)
    inputs["x"][1, 0, 0] = float("nan")
    y, (h, c) = run_lstm("torch")(**inputs)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1:, 0]).all() and torch.isfinite(y[:, 1]).all()


def _bad(**changes):
    inputs = lstm_inputs(3, 2, 8, 8)
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize("inputs, error, match", [
    (_bad(x=torch.randn(3, 8)), ValueError, "x must have 3 dimensions"),
    (_bad(x=torch.zeros(0, 2, 8)), ValueError, "at least one time step"),
    (_bad(x=torch.ones(3, 2, 8, dtype=torch.long)), TypeError, "x must be a floating-point"),
    (_bad(weight_hh=torch.randn(32, 9)), ValueError, "weight_hh"),
    (_bad(weight_ih=torch.randn(32, 7)), ValueError, "weight_ih must have shape"),
    (_bad(bias_hh=torch.randn(31)), ValueError, "bias_hh"),
    (_bad(h0=torch.randn(1, 3, 8)), ValueError, r"hx\[0\] \(h0\)"),
    (_bad(c0=torch.randn(2, 8)), ValueError, r"hx\[1\] \(c0\)"),
    (_bad(weight_ih=torch.randn(32, 8, device="meta")), ValueError, "one device"),
    (_bad(weight_hh=torch.randn(32, 8, dtype=torch.float64)), TypeError, "one dtype"),
])
def test_bad_inputs_raise_clear_errors(inputs, error, match):
    with pytest.raises(error, match=match):
        run_lstm("reference")(**inputs)


def test_hx_must_be_a_pair():
    inputs = lstm_inputs(3, 2, 8, 8, with_state=False)
    with pytest.raises(TypeError, match="hx must be None or a pair"):
        ops.lstm(*inputs.values(), torch.zeros(1, 2, 8))
