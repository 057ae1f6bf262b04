import math

import pytest
import torch

from op_cases import ATTENTION, attention_inputs
from sharnn_fast import ops
from tolerances import compare_in_reduced_precision, fp32_tolerance

# (Tq, Tk, B, d): one query, no memory, memory in front of the keys, widths not powers of two.
SHAPES = [(1, 1, 1, 80), (1, 37, 3, 96), (37, 37, 3, 80), (37, 82, 3, 96), (5, 12, 2, 16)]


@pytest.mark.parametrize("Tq, Tk", [(3, 3), (3, 7), (1, 4)])
def test_reference_gradcheck(Tq, Tk):
    inputs = attention_inputs(Tq, Tk, 2, 4, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in inputs.values()]
    assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, backend="reference"), leaves)


def test_reference_mask_is_aligned_to_the_end():
    """Query i attends exactly to keys 0 .. Tk - Tq + i: checked one query at a time."""
    Tq, Tk, B, d = 4, 9, 2, 8
    q, k, v = attention_inputs(Tq, Tk, B, d, dtype=torch.float64).values()
    y = ops.attention(q, k, v, backend="reference")
    for i in range(Tq):
        visible = Tk - Tq + i + 1
        scores = torch.einsum("bd,kbd->bk", q[i], k[:visible]) / math.sqrt(d)
        expected = torch.einsum("bk,kbd->bd", torch.softmax(scores, -1), v[:visible])
        torch.testing.assert_close(y[i], expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_matches_reference(shape, device):
    ATTENTION.assert_matches_reference("torch", attention_inputs(*shape, device=device), fp32_tolerance(device))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_reduced_precision_on_gpu(dtype):
    compare_in_reduced_precision(ATTENTION.run("torch"), ATTENTION.run("reference"),
                                 attention_inputs(37, 82, 3, 96, device="cuda"), dtype)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_dropout(backend):
    inputs = attention_inputs(8, 12, 2, 16)
    plain = ops.attention(**inputs, backend=backend)
    # p = 0 in training and any p outside training are the no-dropout path.
    torch.testing.assert_close(ops.attention(**inputs, dropout_p=0.0, training=True, backend=backend), plain)
    torch.testing.assert_close(ops.attention(**inputs, dropout_p=0.5, training=False, backend=backend), plain)
    dropped = ops.attention(**inputs, dropout_p=0.5, training=True, backend=backend)
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, plain)


@pytest.mark.parametrize("changes, error, match", [
    (dict(k=torch.randn(3, 2, 16)), ValueError, r"Tk >= Tq"),
    (dict(q=torch.randn(8, 16)), ValueError, "q must have 3 dimensions"),
    (dict(q=torch.randn(0, 2, 16)), ValueError, "q must be non-empty"),
    (dict(k=torch.randn(12, 3, 16)), ValueError, "k must have shape"),
    (dict(k=torch.randn(12, 2, 15)), ValueError, "k must have shape"),
    (dict(v=torch.randn(11, 2, 16)), ValueError, "v must have shape"),
    (dict(v=torch.ones(12, 2, 16, dtype=torch.int32)), TypeError, "v must be a floating-point"),
    (dict(v=torch.randn(12, 2, 16, dtype=torch.float64)), TypeError, "one dtype"),
    (dict(k=torch.randn(12, 2, 16, device="meta")), ValueError, "one device"),
])
def test_bad_inputs_raise_clear_errors(changes, error, match):
    inputs = attention_inputs(8, 12, 2, 16)
    inputs.update(changes)
    with pytest.raises(error, match=match):
        ops.attention(**inputs, backend="reference")


@pytest.mark.parametrize("p", [-0.1, 1.5, "0.1"])
def test_bad_dropout_probability(p):
    with pytest.raises(ValueError, match="dropout_p must be a number in"):
        ops.attention(**attention_inputs(2, 2, 1, 4), dropout_p=p, training=True)
