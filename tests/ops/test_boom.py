import pytest
import torch
import torch.nn.functional as F

from op_cases import BOOM, boom_inputs
from sharnn_fast import ops
from sharnn_fast.ops._dropout import keep_mask
from tolerances import assert_all_close, compare_in_reduced_precision, fp32_tolerance, outputs_and_grads

# (leading shape, d, F): 3-d and 2-d inputs, a single token, widths not powers of two.
SHAPES = [((37, 3), 80, 320), ((1,), 96, 288), ((2, 3, 5), 16, 16), ((4, 1), 80, 160)]


def test_reference_gradcheck():
    inputs = boom_inputs((3, 2), 4, 12, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in inputs.values()]
    assert torch.autograd.gradcheck(BOOM.run("reference"), leaves)


def test_reference_matches_definition():
    x, weight, bias = boom_inputs((5,), 3, 6, dtype=torch.float64).values()
    z = x @ weight.T + bias
    a = z * torch.sigmoid(1.702 * z)
    torch.testing.assert_close(ops.boom(x, weight, bias, backend="reference"), a[:, :3] + a[:, 3:])


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_matches_reference(shape, device):
    BOOM.assert_matches_reference("torch", boom_inputs(*shape, device=device), fp32_tolerance(device))


def test_torch_without_bias():
    x, weight, _ = boom_inputs((7,), 16, 32).values()
    torch.testing.assert_close(ops.boom(x, weight, None, backend="torch"),
                               ops.boom(x, weight, None, backend="reference"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_reduced_precision_on_gpu(dtype):
    compare_in_reduced_precision(BOOM.run("torch"), BOOM.run("reference"),
                                 boom_inputs((37, 3), 80, 320, device="cuda"), dtype)


def test_torch_dropout_uses_one_mask_for_forward_and_backward():
    """Replay the backend's random draw, then check output and gradients against the explicit
    formula with that mask: a different mask in backward would break the gradients."""
    p = 0.3
    inputs = boom_inputs((9, 2), 16, 64)
    torch.manual_seed(7)
    got = outputs_and_grads(BOOM.run("torch", dropout_p=p, training=True), inputs)

    x, weight, bias = inputs.values()
    torch.manual_seed(7)
    keep = keep_mask(torch.empty(9, 2, 64), p)

    def explicit(x, weight, bias):
        z = F.linear(x, weight, bias)
        a = z * torch.sigmoid(1.702 * z) * keep / (1 - p)
        return a.unflatten(-1, (-1, 16)).sum(-2)
    expected = outputs_and_grads(explicit, inputs)
    assert_all_close(got, expected, what="dropout")


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_matches_p(p):
    keep = keep_mask(torch.empty(1000, 997), p)  # odd size: the last word is cut
    assert abs(keep.float().mean().item() - (1 - p)) < 3e-3
    for lane in range(4):  # each 64-bit random word feeds 4 elements: no lane may be biased
        assert abs(keep.flatten()[lane::4].float().mean().item() - (1 - p)) < 6e-3


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_dropout_edges(backend):
    inputs = boom_inputs((6, 2), 16, 48)
    plain = ops.boom(**inputs, backend=backend)
    torch.testing.assert_close(ops.boom(**inputs, dropout_p=0.0, training=True, backend=backend), plain)
    torch.testing.assert_close(ops.boom(**inputs, dropout_p=0.4, training=False, backend=backend), plain)
    torch.testing.assert_close(ops.boom(**inputs, dropout_p=1.0, training=True, backend=backend),
                               torch.zeros_like(plain))


@pytest.mark.parametrize("changes, error, match", [
    (dict(weight=torch.randn(50, 16)), ValueError, "multiple of d=16"),
    (dict(weight=torch.randn(48, 15)), ValueError, "weight must have shape"),
    (dict(bias=torch.randn(47)), ValueError, "bias must have shape"),
    (dict(x=torch.randn(0, 16)), ValueError, "non-empty"),
    (dict(x=torch.ones(3, 16, dtype=torch.long)), TypeError, "x must be a floating-point"),
    (dict(bias=torch.randn(48, device="meta")), ValueError, "one device"),
    (dict(weight=torch.randn(48, 16, dtype=torch.float64)), TypeError, "one dtype"),
])
def test_bad_inputs_raise_clear_errors(changes, error, match):
    inputs = boom_inputs((3,), 16, 48)
    inputs.update(changes)
    with pytest.raises(error, match=match):
        ops.boom(**inputs, backend="torch")
