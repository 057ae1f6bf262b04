"""The triton backend's two attention paths against the reference: materialised scores for wide heads
(d >= WIDE_HEAD_MIN_D, triton_wide.py) and the flash kernel for narrow ones (triton_flash.py).

Without a GPU the softmax kernels run in Triton's interpreter and the products in torch on CPU; small
shapes, and a small scratch budget where the chunked path is wanted. Every buffer a kernel writes
starts as NaN (tests/ops/conftest.py).
"""

import pytest
import torch

pytest.importorskip("triton")

import sharnn_fast  # noqa: E402
from sharnn_fast import ops  # noqa: E402
from sharnn_fast.ops.attention import triton as attention_triton_module  # noqa: E402
from sharnn_fast.ops.attention import materialised, triton_wide  # noqa: E402
import test_attention_triton as flash_tests  # noqa: E402
from op_cases import ATTENTION, attention_inputs  # noqa: E402
from test_attention_triton import device, dropout_mask  # noqa: E402,F401
from tolerances import assert_all_close, fp32_tolerance, outputs_and_grads  # noqa: E402

# (Tq, Tk, B, d, dv): one query, no memory, a memory in front, batch 1 and 3, values narrower than
# keys, and the paper's width. compile_report.py compiles the kernels at these sizes too.
WIDE_SHAPES = [(1, 37, 3, 300, 300), (37, 37, 1, 520, 520), (37, 82, 3, 300, 200), (5, 12, 2, 1024, 520),
               (3, 7, 1, 1024, 1024)]
FLASH_SHAPES = [(37, 82, 3, 96, 96), (1, 12, 1, 80, 80)]
DROPOUT_SHAPE = (37, 82, 3, 300)  # Tq, Tk, B, d
# The flash kernel's checks of behaviour (test_attention_triton.py), run again on the wide path.
FLASH_CHECKS = [flash_tests.test_strided_inputs_and_gradients,
                flash_tests.test_no_dropout_when_p_is_zero_or_not_training,
                flash_tests.test_dropout_matches_reference_with_the_same_mask,
                flash_tests.test_dropout_follows_torch_seed, flash_tests.test_dropout_of_everything,
                flash_tests.test_autocast_casts_to_its_dtype]


@pytest.fixture
def wide_everywhere(monkeypatch):
    """Every head width takes the materialised path; the list counts its forward calls."""
    monkeypatch.setattr(materialised, "WIDE_HEAD_MIN_D", 1)
    calls, op = [], triton_wide.attention_wide_fwd
    monkeypatch.setattr(triton_wide, "attention_wide_fwd", lambda *args: calls.append(args) or op(*args))
    return calls


@pytest.fixture
def flash_everywhere(monkeypatch):
    """Every head width takes the flash kernel."""
    monkeypatch.setattr(materialised, "WIDE_HEAD_MIN_D", 2**31)


def explained_path():
    return sharnn_fast.explain().split("attention: ")[1].split("\n")[0]


def forced(path):
    def fn(q, k, v):
        return attention_triton_module.attention_triton(q, k, v, path=path)
    return fn


@pytest.mark.parametrize("shape", WIDE_SHAPES + FLASH_SHAPES)
def test_fp32_matches_reference_on_the_path_for_its_width(shape, device):
    inputs = attention_inputs(*shape, device=device)
    got = outputs_and_grads(ATTENTION.run("triton"), inputs)
    wide = shape[3] >= materialised.WIDE_HEAD_MIN_D
    assert explained_path().startswith(f"triton (requested explicitly, on {device.type}); "
                                       + ("materialised scores: head width" if wide else "flash kernel: head width"))
    assert_all_close(got, outputs_and_grads(ATTENTION.run("reference"), inputs), fp32_tolerance(device, "triton"),
                     what=f"triton attention {shape}")


@pytest.mark.parametrize("shape", [(37, 82, 3, 300, 300), (5, 12, 2, 1024, 520)])
def test_fp16_matches_reference(shape, device):
    ATTENTION.assert_reduced_precision("triton", shape, torch.float16, device)


@pytest.mark.parametrize("path, shape", [("wide", (5, 12, 2, 16, 16)), ("wide", (37, 37, 1, 80, 48)),
                                         ("flash", flash_tests.WIDE_SHAPE)])
def test_either_path_takes_any_width(path, shape, device):
    """The materialised path at narrow widths and the flash kernel past WIDE_HEAD_MIN_D, asked for."""
    inputs = attention_inputs(*shape, device=device)
    assert_all_close(outputs_and_grads(forced(path), inputs),
                     outputs_and_grads(ATTENTION.run("reference"), inputs), fp32_tolerance(device, "triton"),
                     what=f"triton attention, {path} path")
    with pytest.raises(ValueError, match="path must be None, 'flash' or 'wide'"):
        forced("materialised")(**inputs)


@pytest.mark.parametrize("check", FLASH_CHECKS, ids=lambda check: check.__name__.removeprefix("test_"))
def test_flash_kernel_checks_pass_on_the_wide_path(check, device, wide_everywhere):
    """Strided inputs and gradients, dropout against the reference with the kernels' own mask, seeds,
    p = 0, p = 1 and autocast, as test_attention_triton.py checks them, on the materialised path."""
    check(device)
    assert wide_everywhere


def test_chunked_dropout_regenerates_the_same_mask(device, wide_everywhere, monkeypatch):
    """The same check with the forward in query chunks and the backward in single query rows."""
    monkeypatch.setattr(materialised, "SCORES_MEMORY_BUDGET", 10 * 82 * 4)
    flash_tests.test_dropout_matches_reference_with_the_same_mask(device)
    assert "forward in chunks of 1 batch entries x 10 queries, backward in chunks of 1 batch entries x 1 queries" \
        in explained_path()


def test_chunk_plan():
    """Whole batch entries first, query chunks only for an entry too large alone, with the fp32
    accumulators of dK and dV counted; one row is the floor."""
    plan = materialised.chunk_plan
    assert materialised.scratch_bytes_per_score(torch.bfloat16, backward=True) == 12
    assert materialised.scratch_bytes_per_score(torch.float32, backward=False) == 4
    assert plan(16, 1024, 5000, 1024, 1024, torch.bfloat16, backward=True) == (16, 1024)  # the paper's size
    entry = 1024 * 5000 * 12
    assert plan(16, 1024, 5000, 1024, 1024, torch.bfloat16, True, budget=5 * entry + 1) == (5, 1024)
    accumulators = 5000 * 2048 * 4
    assert plan(16, 1024, 5000, 1024, 1024, torch.bfloat16, True, budget=accumulators + 100 * 5000 * 12) == (1, 100)
    assert plan(16, 1024, 5000, 1024, 1024, torch.bfloat16, True, budget=1000) == (1, 1)


def _budgets(Tq, Tk, B, d, dv):
    """Budgets that force (a) batch groups of 2 entries in backward, (b) query chunks of 10 in
    forward and single query rows (fp32 accumulation of dK, dV) in backward."""
    entry = Tq * Tk * materialised.scratch_bytes_per_score(torch.float32, backward=True)
    return {"batch groups": (2 * entry, (3, Tq), (2, Tq)),
            "query chunks": (10 * Tk * 4, (1, 10), (1, 1))}


@pytest.mark.parametrize("split", ["batch groups", "query chunks"])
def test_chunked_path_matches_reference(split, device, monkeypatch):
    shape = (37, 82, 3, 300, 200)
    budget, forward_plan, backward_plan = _budgets(*shape)[split]
    monkeypatch.setattr(materialised, "SCORES_MEMORY_BUDGET", budget)
    Tq, Tk, B, d, dv = shape
    assert materialised.chunk_plan(B, Tq, Tk, d, dv, torch.float32, backward=False) == forward_plan
    assert materialised.chunk_plan(B, Tq, Tk, d, dv, torch.float32, backward=True) == backward_plan
    inputs = attention_inputs(*shape, device=device)
    got = outputs_and_grads(ATTENTION.run("triton"), inputs)
    assert f"backward in chunks of {backward_plan[0]} batch entries x {backward_plan[1]} queries" in explained_path()
    assert_all_close(got, outputs_and_grads(ATTENTION.run("reference"), inputs), fp32_tolerance(device, "triton"),
                     what=f"chunked wide attention ({split})")


def test_query_chunks_accumulate_in_fp32(device, monkeypatch):
    """fp16 with dK and dV summed over single-query chunks: still within 2x the reference's error."""
    monkeypatch.setattr(materialised, "SCORES_MEMORY_BUDGET", 1)
    ATTENTION.assert_reduced_precision("triton", (9, 20, 2, 300, 300), torch.float16, device, draws=2)


def test_dropout_mask_and_keep_rate(device):
    """The mask read back through the op at a wide width: only visible weights kept, about 1 - p of
    them, and the very mask the flash kernel draws for the same seed."""
    Tq, Tk, B, d = DROPOUT_SHAPE
    p, seed = 0.3, 7
    keep = dropout_mask(Tq, Tk, B, d, p, seed, device)  # [B, Tq, Tk]
    assert "; materialised scores" in explained_path()
    visible = torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(Tk - Tq)
    assert not keep[:, ~visible].any()
    dropped_fraction = 1 - keep[:, visible].float().mean().item()
    assert abs(dropped_fraction - p) < 0.03, dropped_fraction
    assert torch.equal(keep, dropout_mask(Tq, Tk, B, 80, p, seed, device))
    assert "; flash kernel" in explained_path()


class _KernelNotRun:
    """Stands in for a kernel that writes nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def test_poisoned_buffers_expose_an_unwritten_element(device, monkeypatch):
    """With the softmax kernel writing nothing, the poisoned weights and log-sum-exp make every
    output NaN: an element the kernels forget to write cannot pass by luck."""
    monkeypatch.setattr(triton_wide, "attention_wide_softmax_fwd_kernel", _KernelNotRun())
    q, k, v = (t.half() for t in attention_inputs(5, 12, 2, 300, 300, device).values())
    out, lse = triton_wide.attention_wide_fwd(q, k, v, 0.0, None)
    assert torch.isnan(out).all() and torch.isnan(lse).all()


def test_bad_arguments_are_clear_errors(device):
    q, k, v = attention_inputs(5, 4, 2, 300, 300, device).values()
    with pytest.raises(ValueError, match=r"Tk >= Tq"):
        torch.ops.sharnn_fast.attention_wide_fwd(q, k, v, 0.0, None)
    q, k, v = attention_inputs(5, 12, 2, 300, 300, device).values()
    with pytest.raises(ValueError, match="dropout_p = 0.1 needs seed"):
        torch.ops.sharnn_fast.attention_wide_fwd(q, k, v, 0.1, None)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_registered_ops_pass_opcheck(dropout_p, device):
    """Schema, fake (explicit, so it is checked on CPU too) and autograd registration."""
    q, k, v = (t.requires_grad_(True) for t in attention_inputs(5, 12, 2, 300, 260, device).values())
    seed = torch.tensor([3], device=device) if dropout_p else None
    torch.library.opcheck(torch.ops.sharnn_fast.attention_wide_fwd, (q, k, v, dropout_p, seed))


def test_torch_compile_fullgraph(device):
    """torch.compile traces ops.attention's wide path as one node (AOT autograd with the fake and
    autograd registrations; inductor's code generation is the GPU test's)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    sharnn_fast.backend.preload("triton")  # as set_backend does: no import while tracing
    counter = CompileCounterWithBackend("aot_eager")
    inputs = attention_inputs(5, 12, 2, 300, 300, device)
    compiled = torch.compile(ATTENTION.run("triton"), fullgraph=True, backend=counter)
    assert_all_close(outputs_and_grads(compiled, inputs), outputs_and_grads(ATTENTION.run("triton"), inputs),
                     1e-6, what="compiled wide attention")
    assert counter.frame_count == 1 and "sharnn_fast.attention_wide_fwd" in counter.graphs[0].code


@pytest.mark.gpu
def test_bf16_on_gpu_on_the_wide_path(wide_everywhere):
    flash_tests.test_bf16_matches_reference_on_gpu()


@pytest.mark.gpu
@pytest.mark.parametrize("Tk", [1024, 5000])
def test_flash_kernel_at_the_paper_width_on_gpu(Tk, flash_everywhere):
    """test_attention_triton.py's paper-size test now takes the wide path; the flash kernel, still
    benchmarked at d 1024, keeps its check here."""
    flash_tests.test_paper_sizes_bf16_on_gpu(Tk)


@pytest.mark.gpu
def test_torch_compile_inductor_on_gpu_on_the_wide_path(wide_everywhere):
    flash_tests.test_torch_compile_fullgraph_on_gpu()
