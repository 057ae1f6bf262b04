"""The triton Boom against the reference: outputs and every gradient, dropout, errors.

Without CUDA the kernels run on CPU in Triton's interpreter (float32 and float16); with CUDA the same
tests run on the GPU, plus bfloat16, the paper's size and torch.compile (marked gpu)."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from op_cases import BOOM, boom_inputs
from sharnn_fast import BackendUnavailableError, ops
from tolerances import assert_all_close, assert_all_close_reduced, fp32_tolerance, outputs_and_grads

boom_triton = importlib.import_module("sharnn_fast.ops.boom.triton")

# (leading shape, d, F): T = 1 and 37, B = 1 and 3, widths not powers of two, a 2-d and a 3-d
# input, one chunk with d smaller than every tile.
SHAPES = [((37, 3), 80, 320), ((1, 3), 80, 320), ((37, 1), 80, 160), ((1, 1), 96, 288),
          ((5,), 80, 240), ((2, 3, 5), 16, 16)]


@pytest.fixture
def device(triton_device):
    """The GPU if there is one (the test is then marked gpu), else the CPU under the interpreter."""
    return triton_device


def compare_with_reference(inputs, dtype, what, **kwargs):
    """Outputs and gradients of every input: float32 to float32 (tf32 on a GPU) rounding; a reduced
    dtype no further from the float32 reference than twice the reference in that dtype."""
    expected = outputs_and_grads(BOOM.run("reference", **kwargs), inputs)
    low = {k: v.to(dtype) for k, v in inputs.items()}
    got = outputs_and_grads(BOOM.run("triton", **kwargs), low)
    if dtype == torch.float32:
        tolerance = fp32_tolerance(low["x"].device, "triton")
        assert_all_close(got, expected, tolerance, what=what)
        return
    assert_all_close_reduced(got, outputs_and_grads(BOOM.run("reference", **kwargs), low), expected, what)
    assert got[0][0].dtype == dtype and all(g.dtype == dtype for g in got[1].values())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_matches_reference(shape, dtype, device):
    compare_with_reference(boom_inputs(*shape, device), dtype, f"{shape} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_without_bias(dtype, device):
    compare_with_reference(boom_inputs((7, 3), 80, 160, device, bias=False), dtype, "no bias")


def test_non_contiguous_input(device):
    """x [B, T, d] seen as [T, B, d], and a weight that is the transpose of a [d, F] tensor."""
    x = torch.randn(3, 37, 80, device=device).transpose(0, 1)
    weight = (torch.randn(80, 240, device=device) * 80 ** -0.5).t()
    inputs = dict(x=x, weight=weight, bias=0.1 * torch.randn(240, device=device))
    BOOM.assert_matches_reference("triton", inputs, fp32_tolerance(device, "triton"), what="non-contiguous")


def test_autocast(device):
    """Under autocast the op runs in the autocast dtype, as the reference's Linear does."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16  # the interpreter has no bf16
    inputs = boom_inputs((9, 2), 80, 160, device)
    with torch.autocast(device.type, dtype=dtype):
        got = outputs_and_grads(BOOM.run("triton"), inputs)
        reference_low = outputs_and_grads(BOOM.run("reference"), inputs)
    expected = outputs_and_grads(BOOM.run("reference"), inputs)
    assert_all_close_reduced(got, reference_low, expected, "autocast")
    assert got[0][0].dtype == dtype
    assert all(g.dtype == torch.float32 for g in got[1].values())  # float32 leaves keep float32 grads


# ---- dropout ----

def recover_keep_mask(lead, d, F_, device, seed, dropout_p):
    """The [*lead, F] keep mask the kernels draw under ``torch.manual_seed(seed)``, read back
    through the op itself: with a zero weight and a bias of 1 on chunk c and 0 elsewhere (GELU(0) = 0),
    y = keep[..., chunk c] * GELU(1) / (1 - p). The mask depends only on the seed and the element's
    (token, column), not on the values, so one call per chunk recovers it."""
    gelu_one = 1.0 / (1.0 + torch.exp(torch.tensor(-1.702))).item()
    x, weight = torch.randn(*lead, d, device=device), torch.zeros(F_, d, device=device)
    chunks = []
    for c in range(F_ // d):
        bias = torch.zeros(F_, device=device)
        bias[c * d:(c + 1) * d] = 1.0
        torch.manual_seed(seed)
        y = ops.boom(x, weight, bias, dropout_p=dropout_p, training=True, backend="triton")
        kept = y * (1 - dropout_p) / gelu_one
        assert torch.allclose(kept, kept.round(), atol=1e-5), "kept elements must carry the full value"
        chunks.append(kept.round().bool())
    return torch.cat(chunks, dim=-1)


def use_tiles(monkeypatch, **tiles):
    """Launch ``tiles[kernel]`` (block sizes) instead of the configured ones, for kernel "fwd" or "dz"."""
    configured = boom_triton.launch_config

    def launch_config(kernel, dtype, interpreter):
        return dict(configured(kernel, dtype, interpreter), **tiles.get(kernel, {}))
    monkeypatch.setattr(boom_triton, "launch_config", launch_config)


def test_dropout_mask_does_not_depend_on_the_tiles(monkeypatch, device):
    """Four elements share a Philox call, but which four is fixed by (token, chunk, column), so
    other tiles (and other grids) draw the same mask bit for bit."""
    lead, d, F_ = (37, 3), 80, 320
    configured = recover_keep_mask(lead, d, F_, device, seed=7, dropout_p=0.5)
    for tiles in (dict(BLOCK_M=16, BLOCK_N=16), dict(BLOCK_M=64, BLOCK_N=32)):
        use_tiles(monkeypatch, fwd=tiles)
        assert torch.equal(recover_keep_mask(lead, d, F_, device, seed=7, dropout_p=0.5), configured), tiles


@pytest.mark.parametrize("dz_tiles", [None, dict(BLOCK_M=16, BLOCK_N=32)],
                         ids=["configured", "other dz tiles"])
def test_dropout_mask_is_the_same_in_forward_and_backward(dz_tiles, monkeypatch, device):
    """Output and all gradients equal the explicit formula with the mask recovered from forward:
    backward regenerating a different mask would break the gradients, also when its tiles are
    not the forward's."""
    p, lead, d, F_ = 0.3, (37, 3), 80, 320
    keep = recover_keep_mask(lead, d, F_, device, seed=7, dropout_p=p)
    if dz_tiles is not None:
        use_tiles(monkeypatch, dz=dz_tiles)
    inputs = boom_inputs(lead, d, F_, device)
    torch.manual_seed(7)
    got = outputs_and_grads(BOOM.run("triton", dropout_p=p, training=True), inputs)

    def explicit(x, weight, bias):
        z = F.linear(x, weight, bias)
        a = z * torch.sigmoid(1.702 * z) * keep / (1 - p)
        return a.unflatten(-1, (-1, d)).sum(-2)
    expected = outputs_and_grads(explicit, inputs)
    assert_all_close(got, expected, fp32_tolerance(device, "triton"), what="dropout")


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_matches_p(p, device):
    keep = recover_keep_mask((2003,), 80, 80, device, seed=3, dropout_p=p)  # 160240 elements
    assert abs(keep.float().mean().item() - (1 - p)) < 6e-3  # > 4 standard deviations
    # Neither tokens nor columns may be biased: each half of either agrees with p too.
    for part in (keep[:1000], keep[1000:], keep[:, :40], keep[:, 40:]):
        assert abs(part.float().mean().item() - (1 - p)) < 9e-3


def test_dropout_is_reproducible_and_fresh_each_call(device):
    inputs = boom_inputs((37, 3), 80, 160, device)
    torch.manual_seed(5)
    first = ops.boom(**inputs, dropout_p=0.5, training=True, backend="triton")
    second = ops.boom(**inputs, dropout_p=0.5, training=True, backend="triton")
    torch.manual_seed(5)
    again = ops.boom(**inputs, dropout_p=0.5, training=True, backend="triton")
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


def test_dropout_edges(device):
    inputs = boom_inputs((6, 2), 80, 160, device)
    plain = ops.boom(**inputs, backend="triton")
    torch.testing.assert_close(ops.boom(**inputs, dropout_p=0.0, training=True, backend="triton"), plain,
                               rtol=0, atol=0)
    torch.testing.assert_close(ops.boom(**inputs, dropout_p=0.4, training=False, backend="triton"), plain,
                               rtol=0, atol=0)
    dropped = outputs_and_grads(BOOM.run("triton", dropout_p=1.0, training=True), inputs)
    for t in [dropped[0][0], *dropped[1].values()]:
        assert torch.equal(t, torch.zeros_like(t))


# ---- errors ----

def test_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    """why_not reads TRITON_INTERPRET when called (the kernels were defined under it already)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = boom_inputs((3,), 16, 32, "cpu")
    with pytest.raises(BackendUnavailableError, match="CUDA tensors; got cpu.*TRITON_INTERPRET=1"):
        ops.boom(**inputs, backend="triton")


def test_interpreter_has_no_bfloat16():
    inputs = boom_inputs((3,), 16, 32, "cpu", dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="no bfloat16"):
        ops.boom(**inputs, backend="triton")


def test_unsupported_dtype():
    inputs = boom_inputs((3,), 16, 32, "cpu", dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="float32, float16 and bfloat16, got torch.float64"):
        ops.boom(**inputs, backend="triton")


def test_activation_too_large_for_int32_indexing():
    x = torch.empty(1, 16).expand(2**20, 16)  # no memory: why_not only reads shapes
    weight = torch.empty(2**11, 16)
    assert "2**31 elements" in boom_triton.IMPLEMENTATION.why_not(x, weight, None, 0.0, False)


def test_width_not_a_multiple_of_d_is_a_clear_error(device):
    """Through the public op and through the registered op itself."""
    x, weight = torch.randn(3, 16, device=device), torch.randn(40, 16, device=device)
    with pytest.raises(ValueError, match="multiple of d=16"):
        ops.boom(x, weight, None, backend="triton")
    with pytest.raises(ValueError, match="multiple of d=16"):
        torch.ops.sharnn_fast.boom_fwd(x, weight, None, None, 0.0)


# ---- GPU only ----

@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_bfloat16_on_gpu(shape):
    compare_with_reference(boom_inputs(*shape, "cuda"), torch.bfloat16, f"{shape} bf16")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paper_size_on_gpu(dtype):
    """16 x 1024 tokens, d 1024, F 4096."""
    compare_with_reference(boom_inputs((1024, 16), 1024, 4096, "cuda"), dtype, f"paper size {dtype}")


@pytest.mark.gpu
def test_registered_ops_pass_opcheck():
    """Schema, fake (meta) implementation and autograd registration, as torch.library checks them."""
    x, weight, bias = boom_inputs((37,), 80, 160, "cuda").values()
    seed = torch.zeros(1, dtype=torch.int64, device="cuda")
    for s, p in ((None, 0.0), (seed, 0.2)):
        torch.library.opcheck(boom_triton.boom_fwd, (x.requires_grad_(), weight.requires_grad_(),
                                                     bias.requires_grad_(), s, p))


@pytest.mark.gpu
def test_torch_compile_fullgraph_on_gpu():
    inputs = boom_inputs((37, 3), 80, 320, "cuda", dtype=torch.bfloat16)

    def fn(x, weight, bias):
        return ops.boom(x, weight, bias, dropout_p=0.1, training=True, backend="triton")
    torch.manual_seed(11)
    eager = outputs_and_grads(fn, inputs)
    torch.manual_seed(11)
    # fallback_random: the compiled graph draws the seed with torch's generator, as eager does.
    with torch._inductor.config.patch(fallback_random=True):
        compiled = outputs_and_grads(torch.compile(fn, fullgraph=True), inputs)
    assert_all_close(compiled, eager, 1e-2, what="compiled")
