import pytest
import torch
import torch.nn as nn

from op_cases import LSTM, lstm_inputs
from sharnn_fast import ops
from tolerances import (CUDNN_BF16_SLACK, REDUCED_SLACK, assert_all_close, compare_in_reduced_precision,
                        fp32_tolerance, outputs_and_grads)

# (T, B, I, H): single step, batch of one, odd lengths and batches, widths not powers of two.
SHAPES = [(1, 1, 8, 8), (1, 3, 80, 96), (37, 3, 96, 80), (5, 1, 80, 80)]


@pytest.mark.parametrize("with_state", [True, False])
def test_reference_gradcheck(with_state):
    inputs = lstm_inputs(4, 2, 3, 5, dtype=torch.float64, with_state=with_state)
    names = list(inputs)
    leaves = [inputs[n].requires_grad_(True) for n in names]
    fn = LSTM.run("reference")

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
    assert_all_close(outputs_and_grads(LSTM.run("reference"), inputs),
                     outputs_and_grads(nn_lstm, inputs), what="reference vs nn.LSTM")


@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_matches_reference(shape, with_state, device):
    LSTM.assert_matches_reference("torch", lstm_inputs(*shape, device=device, with_state=with_state),
                                  fp32_tolerance(device))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_reduced_precision_on_gpu(dtype):
    slack = CUDNN_BF16_SLACK if dtype == torch.bfloat16 else REDUCED_SLACK
    compare_in_reduced_precision(LSTM.run("torch"), LSTM.run("reference"),
                                 lstm_inputs(37, 3, 96, 80, device="cuda"), dtype, slack=slack)


def test_nan_input_propagates_without_crash():
    inputs = lstm_inputs(3, 2, 8, 8)
    inputs["x"][1, 0, 0] = float("nan")
    y, (h, c) = LSTM.run("torch")(**inputs)
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
        LSTM.run("reference")(**inputs)


def test_hx_must_be_a_pair():
    inputs = lstm_inputs(3, 2, 8, 8, with_state=False)
    with pytest.raises(TypeError, match="hx must be None or a pair"):
        ops.lstm(*inputs.values(), torch.zeros(1, 2, 8))
