import pytest
import torch
import torch.nn as nn

from op_cases import LSTM, lstm_inputs
from sharnn_fast.ops.lstm import torch_native
import sharnn_fast
from sharnn_fast import ops
from tolerances import (CUDNN_BF16_SLACK, REDUCED_SLACK, assert_all_close, assert_close_reduced,
                        compare_in_reduced_precision, fp32_tolerance, outputs_and_grads)

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


# ---- bfloat16 through cuDNN's float16 LSTM (ops/lstm/torch_native.py, _Float16ForBfloat16) ------
# On CUDA the route is taken where cuDNN has its persistent algorithm; here it is forced on CPU,
# with oneDNN off so that ATen's own float16 and bfloat16 LSTMs run on any x86-64 CPU.
@pytest.fixture
def via_float16(monkeypatch):
    monkeypatch.setattr(torch_native, "lstm_bfloat16_via_float16", lambda x, weight_hh, dtype: dtype == torch.bfloat16)
    torch_native.FLOAT16_FALLBACKS.clear()
    with torch.backends.mkldnn.flags(enabled=False):
        yield


def _explained_lstm() -> str:
    return next(line for line in sharnn_fast.explain().splitlines() if line.startswith("lstm:"))


def _bf16(inputs):
    return {k: v.to(torch.bfloat16) for k, v in inputs.items()}


def _grads(run, inputs, cotangent_scale=1.0, seed=7):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    y, (h, c) = run(**leaves)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen) * cotangent_scale).sum() for o in (y, h, c))
    return [o.detach() for o in (y, h, c)], dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_bfloat16_via_float16_matches_the_reference(via_float16, shape, with_state):
    """Values and every gradient within the bf16 budget of the float32 reference; the outputs are
    float16 torch.lstm's on the exactly cast inputs, rounded to bfloat16 (so the route ran)."""
    inputs = lstm_inputs(*shape, with_state=with_state)
    got = compare_in_reduced_precision(LSTM.run("torch"), LSTM.run("reference"), inputs, torch.bfloat16)
    low = _bf16(inputs)
    LSTM.run("torch")(**low)
    assert _explained_lstm() == ("lstm: torch (requested explicitly, on cpu); cuDNN's float16 LSTM for "
                                 "bfloat16 inputs (its persistent algorithm at these sizes; exact casts, "
                                 "gradients scaled per call)")
    with torch.no_grad():
        y, (h, c) = _eager_pairs(**{k: v.to(torch.float16) for k, v in low.items()})
    for a, b in zip(got[0], (y, h, c)):
        assert torch.equal(a, b.to(torch.bfloat16))
    assert not torch_native.FLOAT16_FALLBACKS


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_bfloat16_via_float16_keeps_gradients_below_float16s_range(via_float16):
    """Incoming gradients of about 1e-9 (float16's smallest subnormal is 6e-8): unscaled, every
    gradient would be zero in float16; scaled, they match the float32 reference as bf16 does."""
    inputs = lstm_inputs(37, 3, 96, 80)
    expected = _grads(LSTM.run("reference"), inputs, 1e-9)[1]
    reference_bf16 = _grads(LSTM.run("reference"), _bf16(inputs), 1e-9)[1]
    got = _grads(LSTM.run("torch"), _bf16(inputs), 1e-9)[1]
    for name in expected:
        scale = expected[name].abs().max()
        err = ((got[name].double() - expected[name].double()).abs().max() / scale).item()
        ref_err = ((reference_bf16[name].double() - expected[name].double()).abs().max() / scale).item()
        assert err <= 2 * ref_err, f"grad of {name}: {err:.3g} > 2 x {ref_err:.3g}"
    assert not torch_native.FLOAT16_FALLBACKS


def _eager_pairs(x, weight_ih, weight_hh, bias_ih, bias_hh, h0=None, c0=None):
    """torch.lstm itself, in the inputs' dtype (what a call that falls back runs, in bfloat16)."""
    if h0 is None:
        h0 = c0 = x.new_zeros(1, x.shape[1], weight_hh.shape[1])
    y, h, c = _eager_torch_lstm(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0)
    return y, (h, c)


def test_bfloat16_via_float16_falls_back_when_an_input_exceeds_float16(via_float16):
    """x = 1e5 is inf in float16; with a small weight on it, the gates would saturate on the inf
    and return finite, wrong values: the inputs are checked, not only the outputs."""
    inputs = _bf16(lstm_inputs(5, 2, 8, 8))
    inputs["x"][2, 1, 3] = 1e5
    inputs["weight_ih"][:, 3] = 1e-6
    with pytest.warns(RuntimeWarning, match="forward exceeds float16's range"):
        got = _grads(LSTM.run("torch"), inputs)
    expected = _grads(_eager_pairs, inputs)
    assert all(torch.equal(a, b) for a, b in zip(got[0], expected[0]))
    assert all(torch.equal(got[1][k], expected[1][k]) for k in expected[1])
    assert torch.isfinite(got[0][0]).all()
    assert torch_native.FLOAT16_FALLBACKS == {"forward": 1}
    assert _explained_lstm().endswith("torch.lstm in bfloat16 (the float16 route's forward exceeded float16's range)")
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="forward exceeds"):
        y, _ = LSTM.run("torch")(**inputs)  # inference too
    assert torch.equal(y, expected[0][0])


def test_bfloat16_via_float16_falls_back_when_a_gradient_exceeds_float16(via_float16):
    """A weight gradient beyond 65504 times the largest incoming gradient: x[..., 0] = 6e4 (fits
    float16) with small weights on it, so the gates do not saturate and dW_ih[:, 0] sums 6e4 x
    dgates over 15 positions."""
    inputs = _bf16(lstm_inputs(5, 3, 8, 8))
    inputs["x"][..., 0] = 6e4
    inputs["weight_ih"][:, 0] = 1e-5
    with pytest.warns(RuntimeWarning, match="backward exceeds float16's range"):
        got = _grads(LSTM.run("torch"), inputs)
    expected = _grads(_eager_pairs, inputs)
    assert torch_native.FLOAT16_FALLBACKS == {"backward": 1}
    assert torch.isfinite(got[1]["weight_ih"]).all()
    assert all(torch.equal(got[1][k], expected[1][k]) for k in expected[1])


def test_bfloat16_via_float16_propagates_nan_without_falling_back(via_float16):
    inputs = _bf16(lstm_inputs(3, 2, 8, 8))
    inputs["x"][1, 0, 0] = float("nan")
    (y, h, c), grads = _grads(LSTM.run("torch"), inputs)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1:, 0]).all() and torch.isfinite(y[:, 1]).all()
    assert not torch_native.FLOAT16_FALLBACKS


def test_bfloat16_via_float16_gradients_only_for_inputs_that_want_them(via_float16):
    """Only x wants a gradient (frozen weights, no state): it is the float32 reference's within the
    bf16 budget; and a second-order gradient raises instead of returning a wrong value (called
    below ops.lstm, whose own check would raise first)."""
    inputs = lstm_inputs(4, 2, 8, 8, with_state=False)

    def grad_of_x(backend, dtype):
        x = inputs["x"].to(dtype).requires_grad_(True)
        weights = [inputs[k].to(dtype) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        y, _ = ops.lstm(x, *weights, backend=backend)
        y.float().sum().backward()
        return x.grad
    got = grad_of_x("torch", torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert_close_reduced(got, grad_of_x("reference", torch.bfloat16), grad_of_x("reference", torch.float32),
                         "grad of x")
    x = inputs["x"].to(torch.bfloat16).requires_grad_(True)
    weights = [inputs[k].to(torch.bfloat16).requires_grad_(True)
               for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    y, _ = torch_native.lstm_torch(x, *weights)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(y.float().sum(), x, create_graph=True)


@pytest.mark.gpu
@pytest.mark.parametrize("with_state", [True, False])
def test_bfloat16_via_float16_on_gpu(with_state):
    """The route itself on CUDA, where cuDNN runs its persistent float16 LSTM (B 16, I = H = 256):
    taken (explain), within the float16 budget of the float32 reference, no fallback."""
    inputs = lstm_inputs(64, 16, 256, 256, device="cuda", with_state=with_state)
    assert sharnn_fast.backend.lstm_bfloat16_via_float16(inputs["x"], inputs["weight_hh"], torch.bfloat16)
    torch_native.FLOAT16_FALLBACKS.clear()
    compare_in_reduced_precision(LSTM.run("torch"), LSTM.run("reference"), inputs, torch.bfloat16)
    assert "cuDNN's float16 LSTM for bfloat16 inputs" in _explained_lstm()
    assert not torch_native.FLOAT16_FALLBACKS


def _run_torch(leaves):
    return torch_native.lstm_torch(leaves["x"], leaves["weight_ih"], leaves["weight_hh"], leaves["bias_ih"],
                                   leaves["bias_hh"], (leaves["h0"], leaves["c0"]))


def test_bfloat16_via_float16_checks_each_batch_column_on_its_own(via_float16, monkeypatch):
    """A NaN in column 0 is the caller's and propagates; it must not hide float16's overflow in
    column 1: an input x = 1e5 (inf in float16) and an output c_n beyond 65504 in the forward, a
    gradient of x beyond 65504 in the backward (weight_ih[:, 0] = 6e4 on an input that is 0, so the
    forward is untouched)."""
    inputs = _bf16(lstm_inputs(5, 2, 8, 8))
    inputs["x"][1, 0, 2] = float("nan")
    inputs["x"][2, 1, 3] = 1e5
    inputs["weight_ih"][:, 3] = 1e-6
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="forward exceeds"):
        y, _ = _run_torch(inputs)
    expected, _ = _eager_pairs(**inputs)
    assert torch.equal(y[:, 1], expected[:, 1]) and torch.isnan(y[1:, 0]).all()
    # The same for an output. ATen's CPU LSTM rounds the cell state to float16 at every step, so
    # with finite inputs it cannot pass 65504 here; cuDNN may carry it in float32 from step to step
    # (c grows by up to 1 a step). A stand-in for that: column 1's c_n is inf in float16.
    real = torch_native._torch_lstm

    def cell_state_overflows(x, weights, hx, needs_grad):
        y, h, c = real(x, weights, hx, needs_grad)
        if x.dtype == torch.float16:
            c = torch.cat([c[:, :1], torch.full_like(c[:, 1:], float("inf"))], dim=1)
        return y, h, c
    inputs["x"][2, 1, 3] = 1
    _, (_, expected_c) = _eager_pairs(**inputs)
    monkeypatch.setattr(torch_native, "_torch_lstm", cell_state_overflows)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="forward exceeds"):
        _, (_, c) = _run_torch(inputs)
    assert torch.equal(c[0, 1], expected_c[0, 1]) and torch.isnan(c[0, 0]).all()
    monkeypatch.setattr(torch_native, "_torch_lstm", real)

    inputs = _bf16(lstm_inputs(5, 2, 8, 8))
    inputs["x"][..., 0] = 0
    inputs["weight_ih"][:, 0] = 6e4

    def grad_of_x(run):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        y, _ = run(leaves)
        dy = torch.ones_like(y)
        dy[:, 0] = float("nan")
        torch.autograd.backward([y], [dy])
        return leaves["x"].grad
    with pytest.warns(RuntimeWarning, match="backward exceeds"):
        got = grad_of_x(_run_torch)
    expected = grad_of_x(lambda leaves: _eager_pairs(**leaves))
    assert torch_native.FLOAT16_FALLBACKS == {"forward": 2, "backward": 1}
    assert got[:, 1].abs().max() > 65504 and torch.equal(got[:, 1], expected[:, 1])
    assert torch.isnan(got[:, 0]).all()


def test_bfloat16_via_float16_backward_twice_with_retain_graph(via_float16):
    inputs = _bf16(lstm_inputs(4, 3, 8, 8))
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y, (h, c) = _run_torch(leaves)
    loss = y.float().square().sum() + c.float().sum()
    first = torch.autograd.grad(loss, list(leaves.values()), retain_graph=True)
    second = torch.autograd.grad(loss, list(leaves.values()))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(RuntimeError, match="second time"):  # the graph, float16 part included, is freed
        torch.autograd.grad(loss, list(leaves.values()))


def test_bfloat16_via_float16_under_saved_tensor_hooks(via_float16):
    """save_on_cpu and non-reentrant checkpointing see the float16 graph's tensors too (it is built
    under their hooks): the gradients are the same bit for bit."""
    from torch.utils.checkpoint import checkpoint

    inputs = _bf16(lstm_inputs(6, 3, 8, 8))
    plain = _grads(LSTM.run("torch"), inputs)[1]
    packed = []

    def pack(t):
        packed.append(t.dtype)
        return t.clone()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hooked = _grads(LSTM.run("torch"), inputs)[1]
    assert torch.float16 in packed and torch.bfloat16 not in packed
    with torch.autograd.graph.save_on_cpu():
        on_cpu = _grads(LSTM.run("torch"), inputs)[1]
    checkpointed = _grads(lambda **kw: checkpoint(LSTM.run("torch"), use_reentrant=False, **kw), inputs)[1]
    for grads in (hooked, on_cpu, checkpointed):
        assert all(torch.equal(plain[k], grads[k]) for k in plain)
