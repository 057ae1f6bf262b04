"""The cuda LSTM backend: launch planning and error messages (CPU), its custom ops' autograd wiring
through their CPU kernels (which do the CUDA kernels' arithmetic with torch ops), and the kernels
themselves against the reference (GPU-marked)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sharnn_fast
from op_cases import LSTM, lstm_inputs
from sharnn_fast import BackendUnavailableError, _native
from sharnn_fast.ops.lstm import cuda as lstm_cuda
from sharnn_fast.ops.lstm.reference import lstm_reference
from test_lstm import SHAPES
from tolerances import assert_all_close, compare_in_reduced_precision, outputs_and_grads

# Device properties as cudaDeviceGetAttribute reports them.
H100 = lstm_cuda.DeviceLimits("H100 SXM", sm_count=132, shared_per_block=232448,
                              shared_per_sm=233472, registers_per_sm=65536, cooperative_launch=True)
A100 = lstm_cuda.DeviceLimits("A100 SXM", sm_count=108, shared_per_block=166912,
                              shared_per_sm=167936, registers_per_sm=65536, cooperative_launch=True)


def run_recurrence(x, weight_ih, weight_hh, bias_ih, bias_hh, h0=None, c0=None):
    """The cuda backend's host code on any device (on CPU through the ops' CPU kernels)."""
    return lstm_cuda.lstm_recurrence(x, weight_ih, weight_hh, bias_ih, bias_hh,
                                     None if h0 is None else (h0, c0))


# ---- planning (pure, CPU) -----------------------------------------------------------------------

@pytest.mark.parametrize("limits", [H100, A100], ids=lambda d: d.name)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H, B", [(8, 1), (80, 3), (96, 37), (1024, 1), (1024, 16), (2048, 16)])
def test_plan_covers_every_unit_within_the_limits(limits, backward, dtype, H, B):
    plan = lstm_cuda.plan_recurrence(backward, H, B, dtype, limits)
    if isinstance(plan, str):
        assert "shared memory" in plan and str(limits.shared_per_block) in plan, plan
        return
    assert plan.backward == backward
    assert 1 <= plan.blocks <= limits.sm_count  # one block per SM: all resident at once
    assert (plan.blocks - 1) * plan.hidden_per_block < H <= plan.blocks * plan.hidden_per_block
    k = 4 * H if backward else H
    assert plan.chunk % lstm_cuda.STRIPE == 0 and lstm_cuda.STRIPE <= plan.chunk
    assert plan.chunk <= -(-k // lstm_cuda.STRIPE) * lstm_cuda.STRIPE
    assert 1 <= plan.k_splits <= lstm_cuda.WARPS
    assert plan.shared_bytes <= limits.shared_per_block
    assert plan.shared_bytes + lstm_cuda.RESERVED_SHARED_PER_BLOCK <= limits.shared_per_sm
    element = torch.empty((), dtype=dtype).element_size()
    assert plan.shared_bytes == lstm_cuda.shared_bytes(backward, B, H, element,
                                                       plan.hidden_per_block, plan.chunk,
                                                       plan.k_splits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("limits", [H100, A100], ids=lambda d: d.name)
def test_paper_size_fits_in_two_byte_types(limits, dtype):
    for backward in (False, True):
        plan = lstm_cuda.plan_recurrence(backward, 1024, 16, dtype, limits)
        assert isinstance(plan, lstm_cuda.RecurrencePlan), plan


def test_h100_paper_size_plan():
    forward = lstm_cuda.plan_recurrence(False, 1024, 16, torch.bfloat16, H100)
    backward = lstm_cuda.plan_recurrence(True, 1024, 16, torch.bfloat16, H100)
    # 8 units per block: 32 rows of W_hh (64 KB bf16) per block; h_{t-1} staged whole.
    assert (forward.blocks, forward.hidden_per_block, forward.chunk) == (128, 8, 1024)
    assert (backward.blocks, backward.hidden_per_block, backward.chunk) == (128, 8, 4096)
    # 16 x 8 mma tiles: 2 x 2 of them forward (4 warps each), 1 x 2 backward (8 warps each).
    assert (forward.k_splits, backward.k_splits) == (4, 8)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_plan_says_which_limit_a_shape_exceeds(backward):
    # float32 at H 1024 needs 10 units x 4 gates x 1024 x 4 bytes = 160 KB of W_hh per block on
    # an A100's 108 SMs, and its shared vector no longer fits beside it.
    reason = lstm_cuda.plan_recurrence(backward, 1024, 16, torch.float32, A100)
    assert isinstance(reason, str)
    assert "shared memory" in reason and "166912" in reason and "H=1024" in reason, reason
    assert isinstance(lstm_cuda.plan_recurrence(backward, 1024, 16, torch.float32, H100),
                      lstm_cuda.RecurrencePlan)
    assert isinstance(lstm_cuda.plan_recurrence(backward, 4096, 16, torch.bfloat16, H100), str)


def test_plan_limits_the_cells_per_block():
    # 8 units per block on an H100 at H 1024: 128 sequences fill the 1024 register slots.
    assert isinstance(lstm_cuda.plan_recurrence(False, 1024, 128, torch.bfloat16, H100),
                      lstm_cuda.RecurrencePlan)
    reason = lstm_cuda.plan_recurrence(False, 1024, 129, torch.bfloat16, H100)
    assert isinstance(reason, str) and "1032" in reason and "cells per block" in reason, reason


def test_plan_respects_shared_memory_per_sm():
    # The opt-in limit per block of an H100, but smaller SMs, of which 1 KB per block is reserved.
    def with_shared_per_sm(kb):
        return lstm_cuda.DeviceLimits("small SMs", 132, 232448, kb * 1024, 65536, True)
    plan = lstm_cuda.plan_recurrence(False, 1024, 16, torch.float32, with_shared_per_sm(150))
    assert plan.chunk < 1024 and plan.shared_bytes <= 149 * 1024
    reason = lstm_cuda.plan_recurrence(False, 1024, 16, torch.float32, with_shared_per_sm(130))
    assert isinstance(reason, str) and f"allows {129 * 1024}" in reason, reason


def test_plan_needs_cooperative_launch():
    limits = lstm_cuda.DeviceLimits("old GPU", 80, 98304, 98304, 65536, cooperative_launch=False)
    reason = lstm_cuda.plan_recurrence(False, 256, 4, torch.float16, limits)
    assert isinstance(reason, str) and "cooperative" in reason


def test_plan_shrinks_the_chunk_for_large_batches():
    small = lstm_cuda.plan_recurrence(True, 1024, 16, torch.bfloat16, H100)
    large = lstm_cuda.plan_recurrence(True, 1024, 64, torch.bfloat16, H100)
    assert large.chunk < small.chunk and large.shared_bytes <= H100.shared_per_block
    # One unit per block: the cells fit, the staged vector no longer does.
    reason = lstm_cuda.plan_recurrence(True, 128, 1000, torch.float32, H100)
    assert isinstance(reason, str) and "shared memory" in reason, reason


def cuda_kernels_built():
    ext = _native.extension()
    return ext is not None and ext.build_info()["cuda"]


def test_planner_mirrors_the_kernels_constants():
    if not cuda_kernels_built():
        pytest.skip(f"CUDA kernels not built: {_native.build_info()['cuda_reason']}")
    ext = _native.extension()
    assert ext.lstm_recurrence_threads() == lstm_cuda.THREADS
    assert {"lstm.lstm_recurrence_fwd", "lstm.lstm_recurrence_bwd"} <= set(
        _native.build_info()["kernels"])
    for backward in (False, True):
        for B, H, element, hb, chunk, splits in [(16, 1024, 2, 8, 1024, 1), (3, 80, 4, 1, 64, 4),
                                                 (37, 96, 2, 3, 128, 2), (1, 8, 4, 1, 64, 1)]:
            assert (ext.lstm_recurrence_shared_bytes(backward, B, H, element, hb, chunk, splits)
                    == lstm_cuda.shared_bytes(backward, B, H, element, hb, chunk, splits))


def test_launcher_rejects_a_bad_plan_before_touching_the_gpu():
    if not cuda_kernels_built():
        pytest.skip(f"CUDA kernels not built: {_native.build_info()['cuda_reason']}")
    ext = _native.extension()
    with pytest.raises(ValueError, match="chunk must be a positive multiple of 64"):
        ext.lstm_recurrence_fwd("bfloat16", 1, 1, 1, 1, 1, 1, 0, 0, 4, 2, 80, 1, 100, 1, 0)
    with pytest.raises(ValueError, match="dtype must be float32, float16 or bfloat16"):
        ext.lstm_recurrence_bwd("float64", *[1] * 10, 4, 2, 80, 1, 64, 1, 0)
    with pytest.raises(ValueError, match="null data pointer"):
        ext.lstm_recurrence_fwd("float32", 0, 1, 1, 1, 1, 1, 0, 0, 4, 2, 80, 1, 64, 1, 0)


# ---- why_not and errors (CPU) -------------------------------------------------------------------

def test_explicit_cuda_on_cpu_tensors_says_why():
    inputs = lstm_inputs(3, 2, 8, 8)
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run lstm: the cuda "
                       "kernels run on CUDA tensors; got cpu"):
        LSTM.run("cuda")(**inputs)


def test_auto_on_cpu_does_not_pick_cuda():
    LSTM.run("auto")(**lstm_inputs(3, 2, 8, 8))
    assert "cuda" not in sharnn_fast.explain().split("(")[0]


@pytest.fixture
def a100_with_kernels(monkeypatch):
    """why_not's device checks as on an A100 with the kernels built."""
    monkeypatch.setattr(_native, "require_cuda_kernels", lambda what: None)
    monkeypatch.setattr(lstm_cuda, "device_limits", lambda index: A100)


def test_why_not_on_device(a100_with_kernels):
    assert lstm_cuda._why_not_on_device(0, torch.bfloat16, 1024, 16, True) is None
    assert "float64" in lstm_cuda._why_not_on_device(0, torch.float64, 1024, 16, False)
    reason = lstm_cuda._why_not_on_device(0, torch.float32, 1024, 16, False)
    assert reason.startswith("the forward kernel") and "166912" in reason, reason
    reason = lstm_cuda._why_not_on_device(0, torch.bfloat16, 1024, 110, False)
    assert reason.startswith("the forward kernel updates at most 1024"), reason


def test_why_not_plans_the_backward_only_when_a_gradient_is_needed(a100_with_kernels, monkeypatch):
    plan = lstm_cuda.plan_recurrence
    monkeypatch.setattr(lstm_cuda, "plan_recurrence", lambda backward, *args: (
        "no backward" if backward else plan(backward, *args)))
    assert lstm_cuda._why_not_on_device(0, torch.bfloat16, 64, 2, False) is None
    assert lstm_cuda._why_not_on_device(0, torch.bfloat16, 64, 2, True) == "no backward"


def test_why_not_without_kernels_or_gpu_says_so():
    if _native.build_info()["cuda_devices"] > 0:
        pytest.skip("this machine can run the CUDA kernels")
    reason = lstm_cuda._why_not_on_device(0, torch.bfloat16, 64, 2, False)
    assert "the cuda LSTM needs sharnn_fast's CUDA kernels" in reason, reason


def test_why_not_is_a_constant_under_torch_compile():
    def fn(x):
        reason = lstm_cuda._why_not_on_device(0, torch.bfloat16, 1024, 16, True)
        return x + (1 if reason is None else 2)
    assert torch.compile(fn, fullgraph=True, backend="eager")(torch.zeros(2)).tolist() == [2, 2]


def test_why_not_names_the_shared_memory_limit(monkeypatch):
    monkeypatch.setattr(lstm_cuda, "device_limits", lambda index: A100)
    xg = torch.randn(2, 16, 4 * 1024)
    with pytest.raises(ValueError, match="cannot run this shape: the forward kernel .* 166912"):
        lstm_cuda._plan_for(False, xg, 1024)
    assert lstm_cuda._plan_for(False, xg.bfloat16(), 1024).blocks == 103  # ceil(1024 / 10)


@pytest.mark.parametrize("change, match", [
    (dict(w_hh=torch.randn(32, 8, dtype=torch.float64)), "must share one dtype"),
    (dict(gates=torch.randn(3, 2, 32, dtype=torch.bfloat16)), "gates must be float32"),
    (dict(dy=torch.randn(3, 2, 9)), r"dy must have shape \[3, 2, 8\]"),
    ({}, "must be on one CUDA device"),
])
def test_custom_ops_check_what_the_kernels_trust(change, match):
    T, B, H = 3, 2, 8
    same_dtype = dict(w_hh=torch.randn(4 * H, H), c0=torch.randn(1, B, H),
                      dy=torch.randn(T, B, H), dh_n=torch.randn(1, B, H), dc_n=torch.randn(1, B, H))
    float32 = dict(gates=torch.randn(T, B, 4 * H), c_all=torch.randn(T, B, H))
    for name, value in change.items():
        (float32 if name in float32 else same_dtype)[name] = value
    shapes = dict(w_hh=(4 * H, H), gates=(T, B, 4 * H), c0=(1, B, H), dy=(T, B, H))
    with pytest.raises(ValueError, match=match):
        lstm_cuda._check_kernel_arguments("lstm_cuda_bwd", same_dtype, float32, shapes)


# ---- the host code and custom ops on CPU (the ops' CPU kernels stand in for the CUDA ones) ------

@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_host_code_matches_reference_on_cpu(shape, with_state):
    inputs = lstm_inputs(*shape, with_state=with_state)
    assert_all_close(outputs_and_grads(run_recurrence, inputs),
                     outputs_and_grads(LSTM.run("reference"), inputs), what="cuda host code")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_host_code_reduced_precision_on_cpu(dtype):
    outputs, _ = compare_in_reduced_precision(run_recurrence, LSTM.run("reference"),
                                              lstm_inputs(9, 3, 24, 40), dtype)
    assert all(o.dtype == dtype for o in outputs)


def test_gradient_through_one_output_alone():
    # Autograd hands the backward None (or zeros) for y and h_n here.
    leaves = {k: v.requires_grad_(True) for k, v in lstm_inputs(4, 2, 8, 8).items()}
    y, (h_n, c_n) = run_recurrence(**leaves)
    grads = torch.autograd.grad(c_n.sum(), [leaves["weight_hh"], leaves["c0"]])
    expected = torch.autograd.grad(lstm_reference(
        leaves["x"], leaves["weight_ih"], leaves["weight_hh"], leaves["bias_ih"],
        leaves["bias_hh"], (leaves["h0"], leaves["c0"]))[1][1].sum(),
        [leaves["weight_hh"], leaves["c0"]])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)


def test_custom_ops_pass_opcheck():
    T, B, H = 3, 2, 8
    xg, w_hh = torch.randn(T, B, 4 * H), 0.3 * torch.randn(4 * H, H)
    h0, c0 = torch.randn(1, B, H), torch.randn(1, B, H)
    for save in (True, False):
        torch.library.opcheck(lstm_cuda.lstm_cuda_fwd, (xg, w_hh, h0, c0, save))
    _, _, _, gates, c_all = lstm_cuda.lstm_cuda_fwd(xg, w_hh, h0, c0, True)
    grads = (torch.randn(T, B, H), torch.randn(1, B, H), torch.randn(1, B, H))
    torch.library.opcheck(lstm_cuda.lstm_cuda_bwd, (w_hh, gates, c_all, c0, *grads))


def test_torch_compile_traces_without_graph_breaks():
    inputs = lstm_inputs(5, 3, 8, 16)
    compiled = torch.compile(run_recurrence, fullgraph=True, backend="aot_eager")
    assert_all_close(outputs_and_grads(compiled, inputs),
                     outputs_and_grads(LSTM.run("reference"), inputs), what="compiled")


def test_inference_keeps_nothing_for_a_backward(monkeypatch):
    save_flags = []
    forward = lstm_cuda.lstm_cuda_fwd

    def recording_forward(*args):
        save_flags.append(args[-1])
        return forward(*args)
    monkeypatch.setattr(lstm_cuda, "lstm_cuda_fwd", recording_forward)
    inputs = lstm_inputs(4, 2, 8, 8)
    run_recurrence(**inputs)  # nothing requires grad
    leaves = {k: v.requires_grad_(True) for k, v in inputs.items()}
    with torch.no_grad():
        run_recurrence(**leaves)
    run_recurrence(**leaves)
    assert save_flags == [False, False, True]


def test_autocast_runs_the_recurrence_in_the_autocast_dtype():
    leaves = {k: v.requires_grad_(True) for k, v in lstm_inputs(4, 2, 8, 8).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, (h_n, c_n) = run_recurrence(**leaves)
    assert y.dtype == h_n.dtype == c_n.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(leaf.grad.dtype == torch.float32 for leaf in leaves.values())


# ---- the kernels (GPU) --------------------------------------------------------------------------

# (T, B, I, H): one step, odd lengths and batches, widths not powers of two, the paper's width.
# H 37 takes the element-by-element staging of h (rows not a multiple of 16 bytes); float32 at
# (16, 16, 1024, 1024) stages dgates in several chunks; B 40 leaves a partial tile.
GPU_SHAPES = [(1, 1, 8, 8), (1, 3, 80, 96), (37, 3, 96, 80), (5, 1, 80, 80), (4, 2, 16, 37),
              (37, 1, 64, 1024), (16, 16, 1024, 1024), (7, 40, 32, 200)]


def skip_unless_it_fits(inputs):
    """Every GPU shape here fits an H100's (or H200's) 227 KB of shared memory per block; on a
    smaller GPU the ones that do not are skipped (elsewhere a shape that does not fit fails)."""
    x = inputs["x"]
    reason = lstm_cuda._why_not_on_device(x.device.index, x.dtype, inputs["weight_hh"].shape[1],
                                          x.shape[1], True)
    limits = lstm_cuda.device_limits(x.device.index)
    if reason and limits.shared_per_block < H100.shared_per_block:
        pytest.skip(f"does not fit this GPU: {reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_kernels_match_reference_fp32(shape, with_state):
    inputs = lstm_inputs(*shape, device="cuda", with_state=with_state)
    skip_unless_it_fits(inputs)
    # The kernels sum H (resp. 4H) float32 products in another order than cuBLAS does.
    tolerance = torch.float32 if shape[-1] <= 256 else "tf32"
    assert_all_close(outputs_and_grads(LSTM.run("cuda"), inputs),
                     outputs_and_grads(LSTM.run("reference"), inputs), tolerance, what="cuda lstm")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_kernels_reduced_precision(shape, dtype):
    inputs = lstm_inputs(*shape, device="cuda")
    skip_unless_it_fits({k: v.to(dtype) for k, v in inputs.items()})
    compare_in_reduced_precision(LSTM.run("cuda"), LSTM.run("reference"), inputs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_are_deterministic(dtype):
    inputs = {k: v.to(dtype) for k, v in lstm_inputs(37, 16, 64, 1024, device="cuda").items()}
    skip_unless_it_fits(inputs)
    first_out, first_grads = outputs_and_grads(LSTM.run("cuda"), inputs)
    second_out, second_grads = outputs_and_grads(LSTM.run("cuda"), inputs)
    first = first_out + list(first_grads.values())
    second = second_out + list(second_grads.values())
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.gpu
def test_kernels_run_on_a_side_stream_and_under_compile():
    inputs = lstm_inputs(5, 3, 32, 80, device="cuda")
    expected = outputs_and_grads(LSTM.run("reference"), inputs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = outputs_and_grads(LSTM.run("cuda"), inputs)
    torch.cuda.current_stream().wait_stream(stream)
    assert_all_close(got, expected, what="side stream")
    # aot_eager: traces the graph (dynamo, fake tensors, AOT autograd) without inductor's codegen.
    compiled = torch.compile(LSTM.run("cuda"), fullgraph=True, backend="aot_eager")
    assert_all_close(outputs_and_grads(compiled, inputs), expected, what="compiled")


@pytest.mark.gpu
def test_explicit_cuda_names_the_limit_for_a_shape_that_does_not_fit():
    inputs = lstm_inputs(2, 16, 8, 4096, device="cuda", with_state=False)  # 2 MB of W_hh per block
    with pytest.raises(BackendUnavailableError, match="shared memory"):
        LSTM.run("cuda")(**inputs)


_SANITIZED_RUN = """
import torch
from sharnn_fast import ops
torch.manual_seed(0)
T, B, I, H = 3, 3, 16, 80
x = torch.randn(T, B, I, device="cuda", requires_grad=True)
w = [torch.randn(*s, device="cuda", requires_grad=True) * 0.1 for s in
     [(4 * H, I), (4 * H, H), (4 * H,), (4 * H,)]]
hx = (torch.randn(1, B, H, device="cuda"), torch.randn(1, B, H, device="cuda"))
y, (h, c) = ops.lstm(x, *w, hx, backend="cuda")
(y.sum() + h.sum() + c.sum()).backward()
torch.cuda.synchronize()
print("ran")
"""


@pytest.mark.gpu
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_is_clean(tool, tmp_path):
    # About a minute for both tools (CUDA and torch start up under the sanitizer), so opt-in.
    # The child runs in tmp_path: `python -c` puts its working directory first on sys.path, and
    # from the repository root that would import the source tree (no compiled kernels) instead of
    # the sharnn_fast this process imported.
    if os.environ.get("SHARNN_SANITIZER") != "1":
        pytest.skip("set SHARNN_SANITIZER=1 to run compute-sanitizer on the LSTM kernels")
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not on PATH")
    env = dict(os.environ, PYTHONPATH=str(Path(sharnn_fast.__file__).resolve().parents[1]))
    result = subprocess.run(
        [sanitizer, f"--tool={tool}", "--error-exitcode=3", "--kernel-name", "kns=lstm_",
         sys.executable, "-c", _SANITIZED_RUN],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    output = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0 and "ran" in result.stdout, output
