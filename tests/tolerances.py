"""The one tolerance table of the test suite, and the comparison helpers that use it.

Errors are measured as max |actual - expected| / max(max |expected|, SCALE_FLOOR) over a whole
tensor, so one bound serves tensors of any scale; the floor keeps a tensor that is exactly zero in
theory (the gradient of a query that sees one key) from turning rounding noise into a huge ratio. fp32 backends must match the reference to float32 rounding; a
reduced-precision result must be no more than REDUCED_SLACK times as far from the float32 reference
as the reference itself computed in that dtype.
"""
import torch
from torch.utils._pytree import tree_leaves

TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    # float32 inputs through three tf32 products per dot (the triton kernels, ops/_precision.py): each
    # product loses about 2**-21 instead of 2**-24. 5x the float32 bound, and still under the
    # 1.2-2.5e-4 that single-pass tf32 gives on the tests' shapes, so a kernel falling back to
    # Triton's tf32 default fails.
    "tf32x3": 1e-4,
    # float32 inputs through single-pass tf32 tensor cores (cuDNN's default): cuDNN's LSTM measured
    # up to 6.0e-4 on an H200 (2026-12-04) on the tests' shapes
    "tf32": 1e-3,
}
# What each backend's float32 matrix products use on a GPU; README.md, "Precision of float32
# inputs", says the same. On CPU every backend multiplies in float32 (the Triton interpreter too).
FP32_PRECISION_ON_GPU = {
    "reference": torch.float32,  # torch.backends.cuda.matmul.allow_tf32 is off by default
    "torch": "tf32",             # cuDNN's LSTM may use tf32 (torch.backends.cudnn.allow_tf32 is on by default)
    "triton": "tf32x3",          # every tl.dot, explicitly (ops/_precision.py)
    "cuda": torch.float32,       # float32 FMAs, fixed summation order
}
REDUCED_SLACK = 2.0
# cuDNN's bf16 LSTM (its standard algorithm; its rounding order is its own): grad of h0 measured
# 2.25x the bf16 reference's error on an H200 (2026-12-04, tests/ops/test_lstm.py).
CUDNN_BF16_SLACK = 3.0
SCALE_FLOOR = 0.1


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, f"shape {list(actual.shape)} != {list(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), "non-finite values in the result"
    return ((a - e).abs().max() / e.abs().max().clamp_min(SCALE_FLOOR)).item()


def assert_close(actual, expected, tolerance=torch.float32, name="tensor"):
    """``tolerance``: a key of TOLERANCE (a dtype or "tf32") or a number."""
    bound = tolerance if isinstance(tolerance, float) else TOLERANCE[tolerance]
    err = relative_error(actual, expected)
    assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.3g}"


def assert_close_reduced(actual, reference_same_dtype, reference_fp32, name="tensor", *,
                         slack=REDUCED_SLACK, floor=1e-6):
    """A reduced-precision result against the reference in the same dtype and in float32: at most
    ``slack`` times the reference's own error, or ``floor``, whichever is larger."""
    err = relative_error(actual, reference_fp32)
    budget = max(slack * relative_error(reference_same_dtype, reference_fp32), floor)
    assert err <= budget, f"{name}: relative error {err:.3g} > {budget:.3g} ({slack:g}x the reference's, at least {floor:g})"


def fp32_tolerance(device, backend="torch"):
    """The bound for ``backend`` on float32 inputs against the reference: float32 rounding on CPU
    (the Triton interpreter's dots are float32 too), on a GPU the precision the backend's matrix
    products use there (FP32_PRECISION_ON_GPU)."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return FP32_PRECISION_ON_GPU[backend]


def outputs_and_grads(fn, inputs: dict, seed: int = 1234):
    """Run ``fn(**inputs)`` on fresh leaf copies and backpropagate a fixed random cotangent from
    every output tensor (nested tuples allowed). Returns (outputs, {name: grad})."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    outputs = flat_tensors(fn(**leaves))
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen, dtype=torch.float32).to(o.device)).sum()
               for o in outputs)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return [o.detach() for o in outputs], dict(zip(leaves, grads))


def flat_tensors(out) -> list:
    """The tensors of an op's result, in order: a tensor, or nested tuples and lists of them
    (ops.lstm's (y, (h_n, c_n)) -> [y, h_n, c_n])."""
    return tree_leaves(out)


def assert_all_close(got, expected, tolerance=torch.float32, what=""):
    """Compare the (outputs, grads) pairs of two outputs_and_grads calls."""
    (out_a, grads_a), (out_b, grads_b) = got, expected
    assert len(out_a) == len(out_b)
    for i, (a, b) in enumerate(zip(out_a, out_b)):
        assert_close(a, b, tolerance, f"{what} output {i}")
    for name in grads_b:
        assert_close(grads_a[name], grads_b[name], tolerance, f"{what} grad of {name}")


def assert_all_close_reduced(got, reference_low, expected, what="", **bound):
    """assert_close_reduced on every output and gradient of three outputs_and_grads results: the
    reduced-precision run, the reference in that dtype, and the float32 reference. ``bound``:
    assert_close_reduced's slack and floor."""
    for i, (g, r, e) in enumerate(zip(got[0], reference_low[0], expected[0])):
        assert_close_reduced(g, r, e, f"{what} output {i}", **bound)
    for name in expected[1]:
        assert_close_reduced(got[1][name], reference_low[1][name], expected[1][name], f"{what} grad {name}", **bound)


def compare_in_reduced_precision(run, run_reference, inputs: dict, dtype, what="", **bound):
    """``run`` on ``inputs`` cast to ``dtype``, held to the float32 reference (at most
    REDUCED_SLACK times the same-dtype reference's error, or ``bound``: assert_close_reduced's
    slack and floor). Returns the run's (outputs, grads)."""
    expected = outputs_and_grads(run_reference, inputs)
    low = {k: v.to(dtype) for k, v in inputs.items()}
    got = outputs_and_grads(run, low)
    assert_all_close_reduced(got, outputs_and_grads(run_reference, low), expected, what, **bound)
    return got


def compare_in_reduced_precision_over_draws(run, run_reference, make_inputs, dtype, draws=3):
    """``run`` in ``dtype`` within REDUCED_SLACK x the same-dtype reference's error against the
    float32 reference, for every output and gradient, on ``draws`` fresh float32 inputs from
    ``make_inputs()``. Both errors are the worst over the draws: at small sizes one draw's max-norm
    error is set by where the last rounding happens to fall (one query gives an attention's dk one
    product per element), and the reference is sometimes lucky."""
    worst = {}  # name -> [run's worst error, the same-dtype reference's worst error]
    for _ in range(draws):
        inputs = make_inputs()
        expected = outputs_and_grads(run_reference, inputs)
        low = {name: t.to(dtype) for name, t in inputs.items()}
        reference = outputs_and_grads(run_reference, low)
        got = outputs_and_grads(run, low)
        assert all(o.dtype == dtype for o in got[0])
        rows = [(f"output {i}", g, r, e) for i, (g, r, e) in enumerate(zip(got[0], reference[0], expected[0]))]
        rows += [(f"grad of {n}", got[1][n], reference[1][n], expected[1][n]) for n in expected[1]]
        for name, g, r, e in rows:
            errors = worst.setdefault(name, [0.0, 0.0])
            errors[0] = max(errors[0], relative_error(g, e))
            errors[1] = max(errors[1], relative_error(r, e))
    for name, (got_error, ref_error) in worst.items():
        assert got_error <= REDUCED_SLACK * ref_error, (
            f"{name}: relative error {got_error:.3g} > {REDUCED_SLACK} x the reference's {ref_error:.3g}")
