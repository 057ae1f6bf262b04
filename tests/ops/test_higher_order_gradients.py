"""Higher-order gradients (gradient penalties, Hessian-vector products) through every op and backend.

The contract: a backend either gives the same second derivatives as the reference, with respect to
every input, or raises an error that names the op, the backend and the backends that can. A
silently wrong value is the one outcome that is never acceptable: before this was enforced, the
"torch" Boom's once-differentiable backward returned second derivatives off by 86% whenever the
second gradient was taken with respect to an input whose path skipped its guard.
"""
import pytest
import torch

from op_cases import OP_CASES
from sharnn_fast import ops
from tolerances import assert_close, flat_tensors

# Which (op, backend) pairs compute higher-order gradients on CPU: an independent statement of the
# contract, not read from the package. Every other pair must raise.
DIFFERENTIABLE_TWICE_ON_CPU = {
    ("lstm", "reference"), ("attention", "reference"), ("boom", "reference"),
    ("lstm", "torch"),  # ATen's CPU LSTM in float32/float64
    ("boom", "torch"),
}
CPU_BACKENDS = ["reference", "torch", "triton"]
# The inputs: OP_CASES[op].inputs("odd", ...), odd widths; every tensor is an input of the derivatives.


def second_derivatives(fn, inputs, seed=7):
    """d/d(every input) of sum_i <grad_i, r_i>, where grad_i is the first derivative of a random
    projection of every output with respect to input i: every second derivative, mixed ones
    included, reaches some entry."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    gen = torch.Generator().manual_seed(seed)
    outputs = flat_tensors(fn(**leaves))
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device)).sum()
               + (o ** 2).sum() for o in outputs)  # squared: the first derivative depends on y
    grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
    penalty = sum((g * torch.randn(g.shape, generator=gen, dtype=g.dtype).to(g.device)).sum() for g in grads)
    return dict(zip(leaves, torch.autograd.grad(penalty, list(leaves.values()), allow_unused=True)))


@pytest.mark.parametrize("op", OP_CASES)
def test_reference_gradgradcheck(op):
    inputs = OP_CASES[op].inputs("odd", dtype=torch.float64)
    names, leaves = list(inputs), [t.requires_grad_(True) for t in inputs.values()]

    def fn(*tensors):
        return tuple(flat_tensors(OP_CASES[op].run("reference")(**dict(zip(names, tensors)))))

    assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", OP_CASES)
def test_second_derivatives_match_the_reference_or_raise(op, backend):
    # float64 where the backend takes it; the Triton kernels take float32 (they must raise anyway).
    dtype = torch.float32 if backend == "triton" else torch.float64
    inputs = OP_CASES[op].inputs("odd", dtype=dtype)
    if (op, backend) in DIFFERENTIABLE_TWICE_ON_CPU:
        expected = second_derivatives(OP_CASES[op].run("reference"), inputs)
        got = second_derivatives(OP_CASES[op].run(backend), inputs)
        for name, want in expected.items():
            assert_close(got[name], want, torch.float64, f"{op} {backend}: second derivative wrt {name}")
    else:
        with pytest.raises(RuntimeError, match=rf"ops\.{op}: backend '{backend}' computes "
                                               r"first-order gradients only.*'reference'"):
            second_derivatives(OP_CASES[op].run(backend), inputs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_boom_gradient_penalty_wrt_x_from_the_weight_gradient(backend):
    """The reported case: gW = d loss / dW with create_graph, then d |gW|^2 / dx, against autograd
    on an independent float64 formula of the Boom."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    torch.manual_seed(3)
    x = torch.randn(3, 16, dtype=dtype, requires_grad=True)
    W = (0.3 * torch.randn(32, 16, dtype=dtype)).requires_grad_(True)
    b = (0.1 * torch.randn(32, dtype=dtype)).requires_grad_(True)

    def independent(x, W, b):
        z = x @ W.T + b
        return (z * torch.sigmoid(1.702 * z)).view(3, 2, 16).sum(1)

    expected = None
    x64, W64, b64 = (t.detach().double().requires_grad_(True) for t in (x, W, b))
    gW, = torch.autograd.grad((independent(x64, W64, b64) ** 2).sum(), W64, create_graph=True)
    expected, = torch.autograd.grad((gW ** 2).sum(), x64)

    def penalty():
        gW, = torch.autograd.grad((ops.boom(x, W, b, backend=backend) ** 2).sum(), W, create_graph=True)
        return torch.autograd.grad((gW ** 2).sum(), x)[0]

    if ("boom", backend) in DIFFERENTIABLE_TWICE_ON_CPU:
        assert_close(penalty(), expected, torch.float64, "d|gW|^2/dx")
    else:
        with pytest.raises(RuntimeError, match=rf"ops\.boom: backend '{backend}'"):
            penalty()


def test_auto_names_the_backend_it_picked():
    inputs = OP_CASES["attention"].inputs("odd", dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"ops\.attention: backend 'torch' \(picked by 'auto'\)"):
        second_derivatives(OP_CASES["attention"].run("auto"), inputs)


# On a GPU: cuDNN's LSTM and SDPA's fused kernels have no double backward; the Boom's does.
GPU_CASES = [("lstm", "torch", False), ("attention", "torch", False), ("boom", "torch", True),
             ("lstm", "triton", False), ("attention", "triton", False), ("boom", "triton", False),
             ("lstm", "cuda", False)]


@pytest.mark.gpu
@pytest.mark.parametrize("op, backend, exact", GPU_CASES)
def test_second_derivatives_on_gpu(op, backend, exact):
    inputs = OP_CASES[op].inputs("odd", device="cuda")
    if exact:
        expected = second_derivatives(OP_CASES[op].run("reference"), inputs)
        got = second_derivatives(OP_CASES[op].run(backend), inputs)
        for name, want in expected.items():
            assert_close(got[name], want, "tf32", f"{op} {backend}: second derivative wrt {name}")
    else:
        with pytest.raises(RuntimeError, match=rf"ops\.{op}: backend '{backend}' computes first-order"):
            second_derivatives(OP_CASES[op].run(backend), inputs)


def test_first_order_gradients_and_no_grad_are_unaffected_by_the_guard():
    """The guard only fires under create_graph: an ordinary backward and inference are untouched."""
    inputs = OP_CASES["attention"].inputs("odd", dtype=torch.float64)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y = OP_CASES["attention"].run("torch")(**leaves)
    y.sum().backward()
    ref = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    OP_CASES["attention"].run("reference")(**ref).sum().backward()
    for name in leaves:
        assert_close(leaves[name].grad, ref[name].grad, torch.float64, name)
    with torch.no_grad():
        assert not OP_CASES["attention"].run("torch")(**leaves).requires_grad
