"""The dtype contract of the ops (sharnn_fast/ops/_dtypes.py), for every backend that runs on CPU:

- the reference computes in at least float32, so reduced-precision inputs whose intermediate values
  overflow fp16 still give the right answer (the reference is the ground truth the others are held to);
- float64 stays float64 in every backend that accepts it, at float64 accuracy;
- every backend returns the same output and state dtypes, with and without autocast.
"""
import os

import pytest
import torch

from op_cases import OP_CASES
from tolerances import assert_close, flat_tensors

# The triton kernels run on CPU only in Triton's interpreter, in float32 and float16.
TRITON = ["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []


def run_op(op, backend, t):
    return flat_tensors(OP_CASES[op].call(t, backend=backend))


def reference_float64(op, inputs):
    """The exact result on the same (already rounded) inputs."""
    return run_op(op, "reference", {k: v.double() for k, v in inputs.items()})


# ---------------------------------------------------------------------------------------------------
# The reference keeps float32 accuracy for fp16 inputs whose intermediates overflow fp16
# ---------------------------------------------------------------------------------------------------
def overflowing_inputs(op):
    """fp16-representable inputs whose intermediate values leave fp16's range (65504)."""
    torch.manual_seed(11)
    if op == "attention":  # entries +-40 in 64 dims, mostly aligned: q.k ~ 8e4 before the 1/8 scale
        u = torch.randn(64).sign()
        flips = lambda n: torch.where(torch.rand(n, 2, 64) < 0.05, -1.0, 1.0)  # noqa: E731
        q, k = 40 * u * flips(8), 40 * u * flips(12)
        return dict(q=q.half(), k=k.half(), v=torch.randn(12, 2, 64).half())
    if op == "boom":  # pre-activations of -1e6 in half the columns: GELU(z) ~ 0, but z is -inf in fp16
        x = 300 * torch.ones(5, 16)
        weight = torch.cat([-300 * torch.rand(16, 16).add(0.1), 0.05 * torch.randn(16, 16)])
        return dict(x=x.half(), weight=weight.half(), bias=torch.zeros(32).half())
    # LSTM: x W_ih^T = 65536 + 4 j (j a small integer) and b_ih + b_hh = -65536, so the gates are
    # small, exactly in float32; in fp16 the two halves are +inf and -inf, and their sum NaN.
    T, B, I, H = 4, 2, 16, 8
    return dict(x=torch.full((T, B, I), 256.0).half(),
                weight_ih=(16 + torch.randint(-1, 2, (4 * H, I)) / 64).half(),
                weight_hh=(0.3 * torch.randn(4 * H, H)).half(),
                bias_ih=torch.full((4 * H,), -32768.0).half(),
                bias_hh=torch.full((4 * H,), -32768.0).half())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp16-inputs", "fp16-autocast"])
@pytest.mark.parametrize("op", OP_CASES)
def test_reference_is_accurate_where_fp16_intermediates_overflow(op, autocast):
    inputs = overflowing_inputs(op)
    expected = reference_float64(op, inputs)
    if autocast:  # float32 inputs, rounded to fp16 by autocast as a kernel would receive them
        with torch.autocast("cpu", dtype=torch.float16):
            got = run_op(op, "reference", {k: v.float() for k, v in inputs.items()})
    else:
        got = run_op(op, "reference", inputs)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == torch.float16
        assert_close(g, e, 1e-3, f"{op} reference output {i} (fp16 rounding only)")


@pytest.mark.parametrize("op", OP_CASES)
def test_reference_gradients_keep_float32_accuracy_in_fp16(op):
    """Backward through the widened reference: fp16 gradients are the exact ones rounded once."""
    torch.manual_seed(12)
    inputs = OP_CASES[op].inputs("small", dtype=torch.float16)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    wide = {k: v.double().requires_grad_(True) for k, v in inputs.items()}
    for tensors in (leaves, wide):
        sum(o.double().sum() for o in run_op(op, "reference", tensors)).backward()
    for name in inputs:
        assert leaves[name].grad.dtype == torch.float16
        assert_close(leaves[name].grad, wide[name].grad, 2e-3, f"{op} reference grad of {name}")


# ---------------------------------------------------------------------------------------------------
# float64 stays float64
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("op", OP_CASES)
def test_float64_keeps_float64_accuracy(op, backend):
    """Against an exact float64 computation: a float32 step anywhere inside would cost ~1e-7."""
    torch.manual_seed(13)
    inputs = {k: v.requires_grad_(True) for k, v in OP_CASES[op].inputs("small", dtype=torch.float64).items()}
    out = run_op(op, backend, inputs)
    assert all(o.dtype == torch.float64 for o in out)
    grads = torch.autograd.grad(sum((o * o).sum() for o in out), list(inputs.values()))
    exact = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    exact_out = flat_tensors(explicit_float64(op, exact))
    exact_grads = torch.autograd.grad(sum((o * o).sum() for o in exact_out), list(exact.values()))
    for i, (o, e) in enumerate(zip(out, exact_out)):
        assert_close(o, e, 1e-12, f"{op} {backend} output {i}")
    for name, g, e in zip(inputs, grads, exact_grads):
        assert g.dtype == torch.float64
        assert_close(g, e, 1e-12, f"{op} {backend} grad of {name}")


def explicit_float64(op, t):
    """Each op written out directly in float64, independent of the package."""
    if op == "boom":
        z = t["x"] @ t["weight"].T + t["bias"]
        a = z * torch.sigmoid(1.702 * z)
        return a.unflatten(-1, (-1, t["x"].shape[-1])).sum(-2)
    if op == "attention":
        q, k, v = t["q"], t["k"], t["v"]
        s = torch.einsum("qbd,kbd->bqk", q, k) / q.shape[-1] ** 0.5
        Tq, Tk = q.shape[0], k.shape[0]
        s = s.masked_fill(torch.ones(Tq, Tk, dtype=torch.bool).triu(Tk - Tq + 1), float("-inf"))
        return torch.einsum("bqk,kbd->qbd", s.softmax(-1), v)
    h, c = t["h0"][0], t["c0"][0]
    ys = []
    for x_t in t["x"]:
        i, f, g, o = (x_t @ t["weight_ih"].T + t["bias_ih"] + h @ t["weight_hh"].T
                      + t["bias_hh"]).chunk(4, -1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h = o.sigmoid() * c.tanh()
        ys.append(h)
    return torch.stack(ys), h[None], c[None]


@pytest.mark.parametrize("op", OP_CASES)
def test_float64_under_autocast_stays_float64(op):
    inputs = OP_CASES[op].inputs("small", dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for backend in ("reference", "torch"):
            assert all(o.dtype == torch.float64 for o in run_op(op, backend, inputs))


# ---------------------------------------------------------------------------------------------------
# Every backend returns the same dtypes
# ---------------------------------------------------------------------------------------------------
CASES = [  # (autocast dtype or None, input dtype)
    (None, torch.float32), (None, torch.float16), (None, torch.bfloat16),
    (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
]


@pytest.mark.parametrize("autocast, dtype", CASES, ids=lambda c: str(c).replace("torch.", ""))
@pytest.mark.parametrize("op", OP_CASES)
def test_every_backend_returns_the_same_dtypes(op, autocast, dtype):
    expected_dtype = autocast or dtype
    backends = ["reference", "torch"] + (TRITON if expected_dtype != torch.bfloat16 else [])
    case = OP_CASES[op]
    for leave_out in [(), case.optional] if case.optional else [()]:  # with and without h0, c0 or bias
        inputs = case.inputs("small", dtype=dtype, leave_out=leave_out)
        seen = {}
        for backend in backends:
            leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                out = run_op(op, backend, leaves)
            seen[backend] = [o.dtype for o in out]
            sum(o.float().sum() for o in out).backward()
            for name, t in leaves.items():  # gradients come back in each input's own dtype
                assert t.grad is not None and t.grad.dtype == t.dtype, f"{backend} grad of {name}"
        assert all(dtypes == [expected_dtype] * len(dtypes) for dtypes in seen.values()), seen
