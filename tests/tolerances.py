"""The one tolerance table of the test suite, and the comparison helpers that use it.

Errors are measured as max |actual - expected| / max(max |expected|, SCALE_FLOOR) over a whole
tensor, so one bound serves tensors of any scale; the floor keeps a tensor that is exactly zero in
theory (the gradient of a query that sees one key) from turning rounding noise into a huge ratio. fp32 backends must match the reference to float32 rounding; a
reduced-precision result must be no more than REDUCED_SLACK times as far from the float32 reference
as the reference itself computed in that dtype.
"""
import torch

TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    "tf32": 3e-4,  # float32 inputs through tf32 tensor cores (or Triton's default fp32 dot)
}
REDUCED_SLACK = 2.0
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


def assert_close_reduced(actual, reference_same_dtype, reference_fp32, name="tensor"):
    """A reduced-precision result against the reference in the same dtype and in float32."""
    err = relative_error(actual, reference_fp32)
    budget = REDUCED_SLACK * relative_error(reference_same_dtype, reference_fp32)
    assert err <= max(budget, 1e-6), f"{name}: relative error {err:.3g} > {budget:.3g} (2x the reference's)"


def fp32_tolerance(device):
    """float32 kernels: exact float32 on CPU (the Triton interpreter's dots are exact), tf32-level
    on a GPU (tensor-core dots, a different summation order than cuBLAS)."""
    return "tf32" if torch.device(device).type == "cuda" else torch.float32


def outputs_and_grads(fn, inputs: dict, seed: int = 1234):
    """Run ``fn(**inputs)`` on fresh leaf copies and backpropagate a fixed random cotangent from
    every output tensor (nested tuples allowed). Returns (outputs, {name: grad})."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    outputs = _flatten(fn(**leaves))
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen, dtype=torch.float32).to(o.device)).sum()
               for o in outputs)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return [o.detach() for o in outputs], dict(zip(leaves, grads))


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in _flatten(item)]


def assert_all_close(got, expected, tolerance=torch.float32, what=""):
    """Compare the (outputs, grads) pairs of two outputs_and_grads calls."""
    (out_a, grads_a), (out_b, grads_b) = got, expected
    assert len(out_a) == len(out_b)
    for i, (a, b) in enumerate(zip(out_a, out_b)):
        assert_close(a, b, tolerance, f"{what} output {i}")
    for name in grads_b:
        assert_close(grads_a[name], grads_b[name], tolerance, f"{what} grad of {name}")


def assert_all_close_reduced(got, reference_low, expected, what=""):
    """assert_close_reduced on every output and gradient of three outputs_and_grads results: the
    reduced-precision run, the reference in that dtype, and the float32 reference."""
    for i, (g, r, e) in enumerate(zip(got[0], reference_low[0], expected[0])):
        assert_close_reduced(g, r, e, f"{what} output {i}")
    for name in expected[1]:
        assert_close_reduced(got[1][name], reference_low[1][name], expected[1][name], f"{what} grad {name}")


def compare_in_reduced_precision(run, run_reference, inputs: dict, dtype, what=""):
    """``run`` on ``inputs`` cast to ``dtype``, held to the float32 reference (at most
    REDUCED_SLACK times the same-dtype reference's error). Returns the run's (outputs, grads)."""
    expected = outputs_and_grads(run_reference, inputs)
    low = {k: v.to(dtype) for k, v in inputs.items()}
    got = outputs_and_grads(run, low)
    assert_all_close_reduced(got, outputs_and_grads(run_reference, low), expected, what)
    return got
