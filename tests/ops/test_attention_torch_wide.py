"""The torch backend's materialised-scores path for wide heads (ops/attention/torch_native.py) against
the reference: selection, values and every gradient, chunking, dropout, NaN-poisoned buffers,
opcheck and torch.compile.

On CUDA the path is what backend="torch" runs from d = 257 up; on CPU SDPA runs at every width, so
the CPU tests force the path (the ``materialised_everywhere`` fixture, or path=...). Every buffer the
path allocates starts as NaN (tests/ops/conftest.py).
"""
import pytest
import torch

import sharnn_fast
from op_cases import ATTENTION, attention_inputs
from sharnn_fast import ops
from sharnn_fast.ops.attention import materialised, torch_native
from sharnn_fast.ops.attention.torch_native import attention_scores_bwd, attention_scores_fwd, attention_torch
from tolerances import assert_all_close, fp32_tolerance, outputs_and_grads, relative_error

# (Tq, Tk, B, d, dv): one query, no memory, a memory in front, batch 1 and 3, values narrower than
# keys, widths not powers of two, and the paper's width.
SHAPES = [(1, 37, 3, 300, 300), (37, 37, 1, 260, 260), (37, 82, 3, 300, 200), (5, 12, 2, 1024, 520),
          (3, 7, 1, 1024, 1024)]


@pytest.fixture
def materialised_everywhere(monkeypatch):
    """backend="torch" takes the materialised path at every width and on every device."""
    monkeypatch.setattr(torch_native, "torch_path", lambda device, d, dtype: "materialised")


def test_selection():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert torch_native.torch_path(cuda, 1024, torch.bfloat16) == "materialised"
    assert torch_native.torch_path(cuda, materialised.WIDE_HEAD_MIN_D, torch.float32) == "materialised"
    assert torch_native.torch_path(cuda, materialised.WIDE_HEAD_MIN_D - 1, torch.float16) == "sdpa"
    assert torch_native.torch_path(cuda, 1024, torch.float64) == "sdpa"
    assert torch_native.torch_path(cpu, 1024, torch.float32) == "sdpa"


def test_explain_names_the_path(materialised_everywhere, monkeypatch):
    ops.attention(**attention_inputs(5, 12, 2, 300, 300), backend="torch")
    assert "materialised scores" in sharnn_fast.explain()
    monkeypatch.setattr(torch_native, "torch_path", lambda device, d, dtype: "sdpa")
    ops.attention(**attention_inputs(5, 12, 2, 300, 300), backend="torch")
    assert "attention: torch" in sharnn_fast.explain()
    assert "scaled_dot_product_attention" in sharnn_fast.explain()


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_reference(shape, device, materialised_everywhere):
    ATTENTION.assert_matches_reference("torch", attention_inputs(*shape, device=device),
                                       fp32_tolerance(device, "reference"), what="torch materialised attention")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_matches_reference(dtype, device, materialised_everywhere):
    ATTENTION.assert_reduced_precision("torch", (37, 82, 3, 300, 300), dtype, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paper_width_on_gpu_takes_the_path(dtype):
    """On CUDA, backend="torch" at d = 1024 runs the materialised path, within the reduced-precision
    bound, under autocast too."""
    ATTENTION.assert_reduced_precision("torch", (64, 200, 2, 1024, 1024), dtype, torch.device("cuda"))
    assert "materialised scores" in sharnn_fast.explain()
    q, k, v = attention_inputs(64, 200, 2, 1024, 1024, device="cuda").values()
    with torch.autocast("cuda", dtype=dtype):
        assert ops.attention(q, k, v, backend="torch").dtype == dtype


@pytest.mark.parametrize("budget, plan", [(2 * 37 * 82 * 20, (2, 37)), (10 * 82 * 20 + 82 * 80 * 4, (1, 10)),
                                          (1, (1, 1))])
def test_chunked_equals_whole(budget, plan, device, monkeypatch):
    """Groups of batch entries, query chunks of one entry (dK and dV summed in fp32) and one row at
    a time all give the unchunked values and gradients."""
    shape = (37, 82, 3, 48, 32)
    assert materialised.chunk_plan(3, 37, 82, 48, 32, torch.float32, True, budget=budget,
                                   score_bytes=torch_native.SCORE_BYTES[True]) == plan
    inputs = attention_inputs(*shape, device=device)
    force = dict(path="materialised")
    whole = outputs_and_grads(lambda q, k, v: attention_torch(q, k, v, **force), inputs)
    monkeypatch.setattr(materialised, "SCORES_MEMORY_BUDGET", budget)
    chunked = outputs_and_grads(lambda q, k, v: attention_torch(q, k, v, **force), inputs)
    assert_all_close(chunked, whole, torch.float32, what=f"chunked ({plan})")


def test_dropout_matches_reference_with_the_same_mask(device):
    """With dropout, out and every gradient equal the reference math with the mask the forward drew
    (returned by the op): softmax, times keep / (1 - p), then P V."""
    Tq, Tk, B, d, p = 37, 82, 3, 300, 0.3
    inputs = attention_inputs(Tq, Tk, B, d, d, device=device)
    torch.manual_seed(7)
    _, _, keep = attention_scores_fwd(*inputs.values(), p)
    assert keep.shape == (B, Tq, Tk) and keep.dtype == torch.bool
    visible = torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(Tk - Tq)
    kept = keep[:, visible].float().mean().item()
    assert abs(kept - (1 - p)) < 0.02, f"kept {kept:.3f} of the visible weights, expected about {1 - p}"

    def with_mask(q, k, v):
        scores = torch.einsum("qbd,kbd->bqk", q, k) / d ** 0.5
        weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) * keep / (1 - p)
        return torch.einsum("bqk,kbd->qbd", weights, v)

    def ours(q, k, v):
        torch.manual_seed(7)
        return attention_torch(q, k, v, p, training=True, path="materialised")

    assert_all_close(outputs_and_grads(ours, inputs), outputs_and_grads(with_mask, inputs),
                     fp32_tolerance(device, "reference"), what="dropout")


def test_dropout_mask_follows_torch_seed(device, monkeypatch):
    """The same seed draws the same mask (outputs and gradients equal, also when chunked); another
    seed another one; p = 0 in training and any p outside training are the plain path; p = 1 drops
    every weight."""
    inputs = attention_inputs(37, 82, 3, 300, 300, device=device)

    def seeded(seed, p=0.2, training=True):
        def fn(q, k, v):
            torch.manual_seed(seed)
            return attention_torch(q, k, v, p, training=training, path="materialised")
        return outputs_and_grads(fn, inputs)

    first = seeded(1)
    assert_all_close(seeded(1), first, 0.0, what="same seed")
    monkeypatch.setattr(materialised, "SCORES_MEMORY_BUDGET", 1)  # one row at a time: a draw per row
    chunked = seeded(1)
    assert_all_close(seeded(1), chunked, 0.0, what="same seed, chunked")
    monkeypatch.undo()
    assert relative_error(seeded(2)[0][0], first[0][0]) > 0.01
    plain = seeded(0, p=0.0, training=False)
    assert_all_close(seeded(3, p=0.0), plain, 0.0, what="p = 0")
    assert_all_close(seeded(3, p=0.5, training=False), plain, 0.0, what="not training")
    out, grads = seeded(4, p=1.0)
    assert (out[0] == 0).all() and all((g == 0).all() for g in grads.values())


def test_higher_order_gradient_raises(materialised_everywhere):
    q, k, v = (t.requires_grad_() for t in attention_inputs(5, 12, 2, 300, 300).values())
    y = ops.attention(q, k, v, backend="torch")
    (grad_q,) = torch.autograd.grad(y.sum(), q, create_graph=False)
    assert torch.isfinite(grad_q).all()
    y = ops.attention(q, k, v, backend="torch")
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(y.sum(), q, create_graph=True)


def test_float64_is_refused_by_the_path_not_computed_in_fp32():
    with pytest.raises(ValueError, match="float64"):
        attention_torch(*attention_inputs(3, 7, 1, 300, 300, dtype=torch.float64).values(), path="materialised")
    with pytest.raises(ValueError, match="path must be"):
        attention_torch(*attention_inputs(3, 7, 1, 300, 300).values(), path="flash")


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_opcheck(dropout_p):
    q, k, v = attention_inputs(5, 12, 2, 40, 24).values()
    torch.library.opcheck(attention_scores_fwd, (q, k, v, 0.0))
    torch.manual_seed(0)
    out, lse, keep = attention_scores_fwd(q, k, v, dropout_p)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(attention_scores_bwd, (grad_out, q, k, v, lse, keep, dropout_p))


def test_compiles_in_one_graph_with_dynamic_shapes(materialised_everywhere):
    """torch.compile(fullgraph=True, dynamic=True) traces the op as one node for symbolic Tq, Tk and
    B (aot_eager: the tracing, fake shapes and autograd registration, without Inductor's minutes of
    C++ compilation on a small CPU), and gives the eager values and gradients."""
    torch._dynamo.reset()
    compiled = torch.compile(ATTENTION.run("torch"), fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in [(5, 12, 2, 300, 300), (7, 20, 3, 300, 300)]:
        inputs = attention_inputs(*shape)
        assert_all_close(outputs_and_grads(compiled, inputs), outputs_and_grads(ATTENTION.run("torch"), inputs),
                         torch.float32, what=f"compiled {shape}")
