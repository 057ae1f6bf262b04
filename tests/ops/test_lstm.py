import pytest
import torch
import torch.nn as nn

from op_cases import LSTM, lstm_inputs
from sharnn_fast.ops.lstm import torch_native
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


# ---- the custom op torch.compile sees (ops/lstm/torch_native.py) ---------------------------------
def _custom_op(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, train=True):
    return torch_native.lstm_torch_fwd(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, train)


def _eager_torch_lstm(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0):
    return torch.lstm(x, (h0, c0), (weight_ih, weight_hh, bias_ih, bias_hh), True, 1, 0.0, True, False, False)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_custom_op_is_the_eager_lstm_on_onednn(shape, train):
    """CPU float32: oneDNN's kernels, as eager torch.lstm. train=True (a backward follows, as
    torch.compile calls it whenever one may): the training forward and its workspace, bitwise
    eager's values and gradients. train=False: the inference forward (float32 rounding away from
    the training one); a backward then finds no workspace and runs the forward again."""
    if not torch_native._uses_onednn(torch.zeros(1)):
        pytest.skip("oneDNN is not available or not enabled in this torch")
    inputs = lstm_inputs(*shape)
    recomputed = torch_native.WORKSPACES.recomputed
    got = outputs_and_grads(lambda **t: _custom_op(**t, train=train), inputs)
    assert torch_native.WORKSPACES.recomputed == recomputed + (not train)
    assert_all_close(got, outputs_and_grads(_eager_torch_lstm, inputs),
                     0.0 if train else fp32_tolerance(torch.device("cpu")), what="custom op vs torch.lstm")


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_custom_op_backpropagation_through_time_matches_the_reference(shape, dtype):
    """The path of every other device and dtype (CUDA, float64, ...): torch.lstm forward, our BPTT
    backward; float32 reaches it here with oneDNN switched off."""
    inputs = lstm_inputs(*shape, dtype=dtype)
    with torch.backends.mkldnn.flags(enabled=False):
        assert not torch_native._uses_onednn(inputs["x"])
        got = outputs_and_grads(_custom_op, inputs)
    assert_all_close(got, outputs_and_grads(LSTM.run("reference"), inputs),
                     1e-12 if dtype == torch.float64 else fp32_tolerance(torch.device("cpu")),
                     what=f"custom op BPTT {dtype}")


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize("used", ["y", "h_n", "c_n"])
@pytest.mark.parametrize("onednn", [True, False])
def test_custom_op_gradients_when_only_one_output_is_used(used, onednn):
    inputs = lstm_inputs(6, 2, 5, 3, dtype=torch.float64 if not onednn else torch.float32)
    index = ["y", "h_n", "c_n"].index(used)

    def one(fn):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        fn(**leaves)[index].sum().backward()
        return [leaves[k].grad for k in inputs]

    expected = one(_eager_torch_lstm)
    with torch.backends.mkldnn.flags(enabled=onednn):
        got = one(_custom_op)
    for name, a, b in zip(inputs, got, expected):
        torch.testing.assert_close(a, b, msg=lambda m: f"grad of {name} from {used} alone: {m}")


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize("onednn", [True, False])
def test_custom_ops_pass_opcheck(onednn):
    """Schema, fake implementations, autograd registration and AOT dispatch with dynamic shapes."""
    inputs = lstm_inputs(5, 3, 4, 6)
    with torch.backends.mkldnn.flags(enabled=onednn):
        args = tuple(t.requires_grad_() for t in inputs.values())
        for train in (True, False):
            torch.library.opcheck(torch_native.lstm_torch_fwd, (*args, train))
        outputs = torch_native.lstm_torch_fwd(*args, True)
        grads = tuple(torch.randn_like(t) for t in outputs)
        torch.library.opcheck(torch_native.lstm_torch_bwd,
                              (*(t.detach() for t in args), *(t.detach() for t in outputs), *grads))
