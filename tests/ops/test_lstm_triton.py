"""The triton backend of ops.lstm against the reference: outputs and the gradient of every input.

On a machine without CUDA the kernels run in Triton's interpreter on CPU tensors (float32 and
float16; one program covers a whole step there, and one test forces the GPU's small tiles);
tools/compile_report.py (run by .ci/run) compiles them for sm_80 and sm_90. With CUDA they run on
the GPU, where bfloat16, the paper's size, CUDA graphs and torch.compile with Inductor are also
tested.
"""
import importlib

import pytest
import torch

pytest.importorskip("triton")

import sharnn_fast
from op_cases import LSTM, lstm_inputs
from sharnn_fast import BackendUnavailableError, ops
from test_lstm import SHAPES
from tolerances import (TOLERANCE, assert_all_close, assert_all_close_reduced, compare_in_reduced_precision,
                        fp32_tolerance, outputs_and_grads)

lstm_triton = importlib.import_module("sharnn_fast.ops.lstm.triton")

PAPER_SHAPE = (1024, 16, 1024, 1024)  # T, B, I, H


@pytest.fixture
def device(triton_device):
    """The GPU if there is one (the test is then marked gpu), else the CPU under the interpreter."""
    return triton_device


def assert_reduced_matches(inputs, dtype):
    """The triton backend in ``dtype`` against the reference in ``dtype`` and in float32: at most
    2x the reference's own error, for every output and gradient."""
    outputs, _ = compare_in_reduced_precision(LSTM.run("triton"), LSTM.run("reference"), inputs, dtype)
    assert all(o.dtype == dtype for o in outputs)


@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_fp32(shape, with_state, device):
    LSTM.assert_matches_reference("triton", lstm_inputs(*shape, device=device, with_state=with_state),
                                  fp32_tolerance(device, "triton"))


@pytest.mark.parametrize("shape", [(37, 3, 96, 80), (1, 1, 80, 96)])
def test_matches_reference_fp16(shape, device):
    assert_reduced_matches(lstm_inputs(*shape, device=device), torch.float16)


def test_gpu_tiles_batch_tiles_and_reduction_loops(monkeypatch, device):
    """Several hidden-unit tiles, two batch tiles and reduction loops with a ragged last chunk: the
    GPU's tiling, which a single program per step (the interpreter's default) never exercises."""
    configured = lstm_triton.launch_config

    def small_gpu_tiles(kernel, B, H, dtype, interpreter):
        return dict(configured(kernel, B, H, dtype, interpreter=False), BLOCK_B=16,
                    BLOCK_K=32 if kernel == "fwd" else 64)
    monkeypatch.setattr(lstm_triton, "launch_config", small_gpu_tiles)
    inputs = lstm_inputs(3, 17, 24, 80, device=device)  # H 80: 10 forward and 5 backward unit tiles
    LSTM.assert_matches_reference("triton", inputs, fp32_tolerance(device, "triton"),
                                  what="triton lstm, GPU tiles")


@pytest.mark.parametrize("only_y", [False, True])
def test_windowed_step_loops(monkeypatch, only_y, device):
    """The windows that CUDA graphs replay (here run directly): four windows of 8 steps and 5 steps
    launched one by one, forward and backward; with and without a gradient for the cell states."""
    monkeypatch.setenv(lstm_triton.GRAPHS_ENV, "1")
    monkeypatch.setattr(lstm_triton, "GRAPH_CHUNK_STEPS", 8)
    inputs = lstm_inputs(37, 3, 16, 24, device=device)

    def outputs(backend):
        def fn(**kwargs):
            y, hx = LSTM.run(backend)(**kwargs)
            return y if only_y else (y, hx)
        return fn
    assert_all_close(outputs_and_grads(outputs("triton"), inputs),
                     outputs_and_grads(outputs("reference"), inputs), fp32_tolerance(device, "triton"),
                     what="windowed triton lstm")


@pytest.mark.parametrize("used", ["y", "h_n", "c_n"])
def test_gradient_through_one_output(used, device):
    """Training detaches (h_n, c_n), so the gradient usually reaches y alone (no gradient for the
    cell states), and one through c_n alone must work too (no gradient for the hidden states)."""
    inputs = lstm_inputs(5, 3, 16, 24, device=device)

    def only(backend):
        def fn(**kwargs):
            y, (h_n, c_n) = LSTM.run(backend)(**kwargs)
            return dict(y=y, h_n=h_n, c_n=c_n)[used]
        return fn
    assert_all_close(outputs_and_grads(only("triton"), inputs),
                     outputs_and_grads(only("reference"), inputs), fp32_tolerance(device, "triton"),
                     what=f"gradient through {used}")


def test_autocast(device):
    """Under autocast the op runs in the autocast dtype (like torch.lstm) and the float32
    parameters get float32 gradients."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16  # the interpreter has no bf16
    inputs = lstm_inputs(6, 3, 16, 24, device=device)
    expected = outputs_and_grads(LSTM.run("reference"), inputs)
    with torch.autocast(device.type, dtype=dtype):
        got = outputs_and_grads(LSTM.run("triton"), inputs)
        reference_low = outputs_and_grads(LSTM.run("reference"), inputs)
    assert_all_close_reduced(got, reference_low, expected, "autocast")
    assert all(o.dtype == dtype for o in got[0])
    assert all(g.dtype == torch.float32 for g in got[1].values())


def test_torch_compile_fullgraph(device):
    """The custom ops trace without graph breaks. On CPU through aot_eager (Inductor's C++ build
    adds nothing the ops are responsible for); on a GPU through Inductor."""
    inputs = lstm_inputs(4, 3, 24, 16, device=device)
    fn = LSTM.run("triton")
    fn(**inputs)  # loads the lazily imported backend before compiling (an import breaks graphs)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="inductor" if device.type == "cuda" else "aot_eager")
    assert_all_close(outputs_and_grads(compiled, inputs),
                     outputs_and_grads(LSTM.run("reference"), inputs), fp32_tolerance(device, "triton"),
                     what="compiled triton lstm")


# ------------------------------------------------------------------------------------------------
# Only with a GPU
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_matches_reference_bf16_on_gpu():
    assert_reduced_matches(lstm_inputs(37, 3, 96, 80, device="cuda"), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paper_size_on_gpu(dtype):
    """No further from the float64 reference than twice the reference computed in that dtype: over
    1024 steps the recurrence amplifies every rounding, so the bound comes from the reference's own
    error. float32 inputs multiply in tf32x3 here (8x float32's rounding per product), so they get
    the tf32x3 bound as a floor: measured 3.0e-6 on an H200 (2026-12-04) where the float32
    reference's own error was 1.4e-6; single-pass tf32 would be 1e-4 and more."""
    inputs = lstm_inputs(*PAPER_SHAPE, device="cuda", dtype=torch.float64)
    floor = TOLERANCE["tf32x3"] if dtype == torch.float32 else 1e-6
    outputs, _ = compare_in_reduced_precision(LSTM.run("triton"), LSTM.run("reference"), inputs, dtype,
                                              floor=floor)
    assert all(o.dtype == dtype for o in outputs)


@pytest.mark.gpu
def test_cuda_graph_windows_match_launches(monkeypatch):
    """Two windows of 32 steps from CUDA graphs and 6 launched steps give exactly what 70 launches
    give, on fresh inputs each call (the first call captures, the second replays)."""
    monkeypatch.setattr(lstm_triton, "GRAPH_CHUNK_STEPS", 32)
    for call in range(2):
        inputs = lstm_inputs(70, 3, 32, 48, device="cuda")
        monkeypatch.setenv(lstm_triton.GRAPHS_ENV, "0")
        launched = outputs_and_grads(LSTM.run("triton"), inputs)
        monkeypatch.setenv(lstm_triton.GRAPHS_ENV, "auto")
        graphed = outputs_and_grads(LSTM.run("triton"), inputs)
        for a, b in zip([*launched[0], *launched[1].values()], [*graphed[0], *graphed[1].values()]):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"call {call}")


# ------------------------------------------------------------------------------------------------
# When the backend cannot run
# ------------------------------------------------------------------------------------------------
def test_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = lstm_inputs(2, 1, 8, 8)
    with pytest.raises(BackendUnavailableError, match="backend 'triton' cannot run lstm: .*TRITON_INTERPRET=1"):
        LSTM.run("triton")(**inputs)
    LSTM.run("auto")(**inputs)  # auto falls back silently
    assert "lstm: torch" in sharnn_fast.explain()


def test_float64_is_refused():
    inputs = lstm_inputs(2, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="float32, float16 and bfloat16, got torch.float64"):
        LSTM.run("triton")(**inputs)


def test_bfloat16_on_cpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("with a GPU the kernels are compiled for it, not for the interpreter")
    inputs = lstm_inputs(2, 1, 8, 8, dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="interpreter .* has no bfloat16"):
        ops.lstm(*list(inputs.values())[:5], backend="triton")


def test_bad_graph_setting_is_refused(monkeypatch, device):
    monkeypatch.setenv(lstm_triton.GRAPHS_ENV, "yes")
    with pytest.raises(ValueError, match=lstm_triton.GRAPHS_ENV):
        LSTM.run("triton")(**lstm_inputs(2, 1, 8, 8, device=device))
