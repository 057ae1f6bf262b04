"""The "triton" backend of ops.attention against the reference: the output and dq, dk, dv.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (float32 and float16, small odd
shapes that still split every width into several masked chunks); on a GPU the same tests run on
CUDA, plus bfloat16, the paper's sizes and torch.compile.
"""
import math

import pytest
import torch

pytest.importorskip("triton")

import sharnn_fast  # noqa: E402
from op_cases import ATTENTION, attention_inputs  # noqa: E402
from sharnn_fast import ops  # noqa: E402
from sharnn_fast.ops.attention import triton as attention_triton_module  # noqa: E402
from sharnn_fast.ops.attention import triton_flash  # noqa: E402
from tolerances import assert_all_close, fp32_tolerance, outputs_and_grads  # noqa: E402

# (Tq, Tk, B, d, dv): one query, no memory, a memory in front of the keys, widths not powers of two,
# values narrower than keys, and a width past 2048.
SHAPES = [(1, 37, 3, 80, 80), (1, 82, 3, 96, 96), (37, 37, 3, 96, 96), (37, 82, 3, 80, 80),
          (5, 12, 2, 80, 48)]
WIDE_SHAPE = (3, 7, 1, 2049, 2049)


@pytest.fixture
def device(triton_device):
    """The GPU if there is one (the test is then marked gpu), else the CPU under the interpreter."""
    return triton_device


@pytest.mark.parametrize("shape", SHAPES + [WIDE_SHAPE])
def test_fp32_matches_reference(shape, device):
    ATTENTION.assert_matches_reference("triton", attention_inputs(*shape, device=device),
                                       fp32_tolerance(device, "triton"))


@pytest.mark.parametrize("shape", SHAPES)
def test_fp16_matches_reference(shape, device):
    ATTENTION.assert_reduced_precision("triton", shape, torch.float16, device)


def test_strided_inputs_and_gradients(device):
    """Batch-first queries, keys and values sliced out of one wider tensor, and an incoming gradient
    in batch-first layout reach the kernels through their strides."""
    Tq, Tk, B, d = 37, 82, 3, 80
    inputs = dict(q=torch.randn(B, Tq, d, device=device), kv=torch.randn(Tk, B, 2 * d + 5, device=device))

    def strided(backend):
        def fn(q, kv):
            y = ops.attention(q.transpose(0, 1), kv[..., 5:d + 5], kv[..., d + 5:], backend=backend)
            return y.transpose(0, 1)  # [B, Tq, d]: the gradient of y arrives batch-first
        return fn

    assert_all_close(outputs_and_grads(strided("triton"), inputs),
                     outputs_and_grads(strided("reference"), inputs), fp32_tolerance(device, "triton"),
                     what="strided triton attention")


def test_64_bit_offsets(monkeypatch, device):
    """The int64 addressing for tensors whose batch entries span 2**31 elements or more, forced on
    small ones; and when it is chosen."""
    wide = triton_flash._wide_offsets
    assert not wide(torch.empty_strided((5000, 16, 1024), (16 * 1024, 1024, 1), device="meta"))
    assert wide(torch.empty_strided((2, 1, 8), (2**31, 8, 1), device="meta"))
    monkeypatch.setattr(triton_flash, "_wide_offsets", lambda *tensors: True)
    ATTENTION.assert_matches_reference("triton", attention_inputs(37, 82, 3, 80, 80, device),
                                       fp32_tolerance(device, "triton"), what="triton attention, 64-bit offsets")


def test_no_dropout_when_p_is_zero_or_not_training(device):
    inputs = attention_inputs(37, 82, 3, 80, 80, device)
    plain = ops.attention(**inputs, backend="triton")
    assert torch.equal(ops.attention(**inputs, dropout_p=0.0, training=True, backend="triton"), plain)
    assert torch.equal(ops.attention(**inputs, dropout_p=0.5, training=False, backend="triton"), plain)


def dropout_mask(Tq, Tk, B, d, p, seed, device):
    """The kernels' keep mask [B, Tq, Tk] for the given torch seed, read off the output for
    one-hot values (output = dropped weights; a kept weight is > 0, a dropped one exactly 0)."""
    q = torch.randn(Tq, B, d, device=device)
    k = torch.randn(Tk, B, d, device=device)
    one_hot = torch.eye(Tk, device=device).unsqueeze(1).expand(Tk, B, Tk)  # [Tk, B, Tk]
    torch.manual_seed(seed)
    weights = ops.attention(q, k, one_hot, dropout_p=p, training=True, backend="triton")  # [Tq, B, Tk]
    return (weights != 0).permute(1, 0, 2)


def test_dropout_matches_reference_with_the_same_mask(device):
    """Dropout = the reference's weights times the kernels' keep mask / (1 - p), in the output and
    in every gradient; about p of the visible weights are dropped; backward regenerates the mask."""
    Tq, Tk, B, d, p, seed = 37, 82, 3, 80, 0.3, 7
    keep = dropout_mask(Tq, Tk, B, d, p, seed, device)  # [B, Tq, Tk]
    visible = torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(Tk - Tq)
    assert not keep[:, ~visible].any()
    dropped_fraction = 1 - keep[:, visible].float().mean().item()
    assert abs(dropped_fraction - p) < 0.03, dropped_fraction

    def reference_with_mask(q, k, v):
        scores = torch.einsum("qbd,kbd->bqk", q, k) / math.sqrt(d)
        weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        return torch.einsum("bqk,kbd->qbd", weights * keep / (1 - p), v)

    def triton_with_seed(q, k, v):
        torch.manual_seed(seed)
        return ops.attention(q, k, v, dropout_p=p, training=True, backend="triton")

    inputs = attention_inputs(Tq, Tk, B, d, 96, device)
    assert_all_close(outputs_and_grads(triton_with_seed, inputs),
                     outputs_and_grads(reference_with_mask, inputs), fp32_tolerance(device, "triton"),
                     what="triton attention with dropout")


def test_dropout_follows_torch_seed(device):
    inputs = attention_inputs(5, 12, 2, 80, 80, device)

    def dropped(seed):
        torch.manual_seed(seed)
        return ops.attention(**inputs, dropout_p=0.5, training=True, backend="triton")

    assert torch.equal(dropped(1), dropped(1))
    assert not torch.equal(dropped(1), dropped(2))


def test_dropout_of_everything(device):
    out, grads = outputs_and_grads(ATTENTION.run("triton", dropout_p=1.0, training=True),
                                   attention_inputs(5, 12, 2, 80, 80, device))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    for name, grad in grads.items():
        assert torch.equal(grad, torch.zeros_like(grad)), name


def test_autocast_casts_to_its_dtype(device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    inputs = attention_inputs(5, 12, 2, 80, 80, device)
    with torch.autocast(device.type, dtype=dtype):
        out = ops.attention(**inputs, backend="triton")
    assert out.dtype == dtype
    cast = {name: t.to(dtype) for name, t in inputs.items()}
    assert torch.equal(out, ops.attention(**cast, backend="triton"))


def test_fewer_keys_than_queries_is_a_clear_error(device):
    q, k, v = attention_inputs(5, 4, 2, 16, 16, device).values()
    with pytest.raises(ValueError, match=r"Tk >= Tq"):
        torch.ops.sharnn_fast.attention_fwd(q, k, v, 0.0, None)


def test_float64_is_refused_with_a_reason(device):
    inputs = attention_inputs(5, 12, 2, 16, 16, device, dtype=torch.float64)
    with pytest.raises(sharnn_fast.BackendUnavailableError, match="float64.*backend='reference'"):
        ops.attention(**inputs, backend="triton")


def test_cpu_without_interpreter_is_refused_with_a_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(sharnn_fast.BackendUnavailableError, match="CUDA tensors; got cpu.*TRITON_INTERPRET=1"):
        ops.attention(**attention_inputs(5, 12, 2, 16, 16, "cpu"), backend="triton")


def test_bfloat16_on_cpu_is_refused_with_a_reason():
    if attention_triton_module.why_not(**attention_inputs(5, 12, 2, 16, 16, "cpu")) is not None:
        pytest.skip("needs the Triton interpreter on CPU")
    inputs = attention_inputs(5, 12, 2, 16, 16, "cpu", dtype=torch.bfloat16)
    with pytest.raises(sharnn_fast.BackendUnavailableError, match="interpreter .* has no bfloat16"):
        ops.attention(**inputs, backend="triton")


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_registered_ops_pass_opcheck(dropout_p, device):
    """Schema and autograd registration of the torch.library ops; on a GPU also the fake
    implementation triton_op derives (under the interpreter fake tensors would reach the kernels)."""
    checks = ("test_schema", "test_autograd_registration")
    if device.type == "cuda":
        checks += ("test_faketensor", "test_aot_dispatch_dynamic")
    q, k, v = (t.requires_grad_(True) for t in attention_inputs(5, 12, 2, 16, 16, device).values())
    seed = torch.tensor([3], device=device) if dropout_p else None
    torch.library.opcheck(torch.ops.sharnn_fast.attention_fwd, (q, k, v, dropout_p, seed), test_utils=checks)


@pytest.mark.gpu
def test_bf16_matches_reference_on_gpu():
    ATTENTION.assert_reduced_precision("triton", (37, 82, 3, 96, 96), torch.bfloat16, torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("Tk", [1024, 5000])
def test_paper_sizes_bf16_on_gpu(Tk):
    """d = 1024, Tq = 1024, the memory at the cap (batch 2 keeps the fp32 reference small)."""
    ATTENTION.assert_reduced_precision("triton", (1024, Tk, 2, 1024, 1024), torch.bfloat16, torch.device("cuda"),
                                     draws=1)


@pytest.mark.gpu
def test_torch_compile_fullgraph_on_gpu():
    inputs = attention_inputs(37, 82, 3, 96, 96, "cuda", dtype=torch.bfloat16)
    compiled = torch.compile(ATTENTION.run("triton"), fullgraph=True)
    assert_all_close(outputs_and_grads(compiled, inputs), outputs_and_grads(ATTENTION.run("triton"), inputs),
                     1e-6, what="compiled triton attention")
