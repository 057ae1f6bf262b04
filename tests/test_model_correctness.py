"""SHARNN on the inputs that used to go silently wrong: checkpoints across vq_collapse() and across
architectures, float64 end to end, higher-order gradients, dtypes under autocast, and CPUs whose
oneDNN cannot run a reduced-precision LSTM."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import sharnn_fast
from sharnn_fast import SHARNN, BackendUnavailableError
from sharnn_fast.ops.lstm import torch_native as lstm_torch_native
from tolerances import assert_close

V, D, F, LAYERS = 10, 16, 32, 3
TRITON = ["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []


def perturbed_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = SHARNN("LSTM", V, D, F, LAYERS, 0.0, 0.0, 0.0, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def run(model, x):
    with torch.no_grad():
        return model(x)[0]


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("source_collapsed", [False, True])
@pytest.mark.parametrize("target_collapsed", [False, True])
def test_loading_reproduces_the_checkpoints_model_across_vq_collapse(source_collapsed, target_collapsed,
                                                                     strict):
    source = perturbed_model(1, attn_layers="all")
    if source_collapsed:
        source.vq_collapse()
    target = SHARNN("LSTM", V, D, F, LAYERS, 0.0, 0.0, 0.0, attn_layers="all").eval()
    if target_collapsed:
        target.vq_collapse()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = torch.get_rng_state()
        target.load_state_dict(source.state_dict(), strict=strict)
        assert torch.equal(torch.get_rng_state(), state), "loading drew random numbers"
    changed_form = source_collapsed != target_collapsed
    assert len(caught) == (LAYERS if changed_form else 0), [str(w.message) for w in caught]
    assert all("attn" in str(w.message) and "collapse" in str(w.message) for w in caught)
    x = torch.randint(0, V, (9, 2))
    assert_close(run(target, x), run(source, x), name="h of the loaded model")
    assert all(b.attn.vq_collapsed == source_collapsed for b in target.blocks)
    # And the loaded model saves what it loaded.
    assert target.state_dict().keys() == source.state_dict().keys()


def test_collapsed_model_takes_an_uncollapsed_checkpoint_and_collapses_again():
    """The reported case: vq_collapse() first, then load a trained, uncollapsed checkpoint."""
    source = perturbed_model(2)
    target = SHARNN("LSTM", V, D, F, LAYERS, 0.0, 0.0, 0.0).eval()
    target.vq_collapse()
    with pytest.warns(UserWarning, match="un-collapsed"):
        target.load_state_dict(source.state_dict(), strict=True)
    target.vq_collapse()
    x = torch.randint(0, V, (9, 2))
    assert_close(run(target, x), run(source, x), name="h")


@pytest.mark.parametrize("strict", [True, False])
def test_attention_weights_for_a_block_without_attention_are_an_error(strict):
    every = perturbed_model(3, attn_layers="all")
    default = SHARNN("LSTM", V, D, F, LAYERS, 0.0, 0.0, 0.0)  # attention in block 1 only
    with pytest.raises(RuntimeError, match=r"weights for blocks\.0\.attn .*attn_layers="):
        default.load_state_dict(every.state_dict(), strict=strict)


@pytest.mark.parametrize("strict", [True, False])
def test_untied_checkpoint_into_a_tied_model_is_an_error(strict):
    untied = perturbed_model(4)
    tied = SHARNN("LSTM", V, D, F, LAYERS, tie_weights=True)
    with pytest.raises(RuntimeError, match="tie_weights"):
        tied.load_state_dict(untied.state_dict(), strict=strict)
    # A tied checkpoint loads either way: its two matrices are equal.
    source = SHARNN("LSTM", V, D, F, LAYERS, tie_weights=True)
    tied.load_state_dict(source.state_dict(), strict=strict)
    perturbed_model(5).load_state_dict(source.state_dict(), strict=strict)


def test_half_of_the_value_gate_layer_is_an_error():
    state = perturbed_model(6).state_dict()
    del state["blocks.1.attn.vq.l1.bias"]
    with pytest.raises(RuntimeError, match=r"vq\.l1\.weight but not .*vq\.l1\.bias"):
        SHARNN("LSTM", V, D, F, LAYERS).load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------------------------
# float64
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_float64_end_to_end(backend):
    model = perturbed_model(7).double()
    reference = perturbed_model(7).double()
    model.backend, reference.backend = backend, "reference"
    x = torch.randint(0, V, (6, 2))
    h, hidden, mems, _, _ = model(x)
    assert h.dtype == torch.float64
    assert all(t.dtype == torch.float64 for pair in hidden for t in pair)
    assert all(m.dtype == torch.float64 for m in mems if torch.is_tensor(m))
    # Carried state, a second segment, and the gradients, all at float64 accuracy.
    h2 = model(x, hidden=hidden, mems=mems)[0]
    expected = reference(x, hidden=reference(x)[1], mems=reference(x)[2])[0]
    assert_close(h2, expected, torch.float64, "h of the second segment")
    h2.sum().backward()
    expected.sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if q.grad is not None:
            assert p.grad.dtype == torch.float64
            assert_close(p.grad, q.grad, torch.float64, f"grad of {name}")


def test_gradcheck_through_the_whole_model_in_float64():
    torch.manual_seed(8)
    model = SHARNN("LSTM", 5, 4, 8, 2, 0.0, 0.0, 0.0, backend="reference").double()
    names = [n for n, p in model.named_parameters()
             if not n.endswith(("qkvs", "r_gate")) and ".lnout." not in n]  # unused by the model
    x = torch.randint(0, 5, (3, 2))
    first = model(x)
    hidden = [tuple(t.detach().requires_grad_(True) for t in pair) for pair in first[1]]
    mems = [m.detach().requires_grad_(True) if torch.is_tensor(m) else [] for m in first[2]]
    state = [t for pair in hidden for t in pair] + [m for m in mems if torch.is_tensor(m)]
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}

    def forward(*tensors):
        values = dict(params, **dict(zip(names, tensors[:len(names)])))
        hid = [tuple(tensors[len(names) + 2 * i: len(names) + 2 * i + 2]) for i in range(2)]
        mem = [tensors[-1] if torch.is_tensor(m) else [] for m in mems]
        h, new_hidden, new_mems, _, _ = torch.func.functional_call(model, values, (x,),
                                                                   dict(hidden=hid, mems=mem))
        logits = torch.nn.functional.linear(h, values["decoder.weight"], values["decoder.bias"])
        return logits, new_hidden[0][1], new_mems[0]

    inputs = [params[n] for n in names] + state
    # fast_mode: the Jacobian checked along random directions (all of it would take a minute).
    assert torch.autograd.gradcheck(forward, inputs, atol=1e-6, rtol=1e-5, fast_mode=True)


# ---------------------------------------------------------------------------------------------------
# Higher-order gradients through the model
# ---------------------------------------------------------------------------------------------------
def hessian_vector_product(model, x, seed=9):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model.decoder(model(x)[0]).logsumexp(-1).sum()
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    gen = torch.Generator().manual_seed(seed)
    pairs = [(g, torch.randn(p.shape, generator=gen, dtype=p.dtype)) for g, p in zip(grads, params)]
    dot = sum((g * v).sum() for g, v in pairs if g is not None)
    return torch.autograd.grad(dot, params, allow_unused=True)


def test_hessian_vector_product_matches_the_reference_without_attention():
    """The reported case: attn_layers=[] with "torch" (LSTM and Boom, both differentiable twice)."""
    x = torch.randint(0, V, (5, 2))
    got = hessian_vector_product(perturbed_model(10, attn_layers=[], backend="torch").double(), x)
    expected = hessian_vector_product(perturbed_model(10, attn_layers=[], backend="reference").double(), x)
    for i, (g, e) in enumerate(zip(got, expected)):
        if e is None:
            assert g is None or not g.any()
        else:
            assert_close(g, e, torch.float64, f"Hessian-vector product, parameter {i}")


def test_hessian_vector_product_through_torch_attention_raises_and_names_it():
    model = perturbed_model(11, backend="torch").double()
    with pytest.raises(RuntimeError, match=r"ops\.attention: backend 'torch' .*'reference'"):
        hessian_vector_product(model, torch.randint(0, V, (5, 2)))


# ---------------------------------------------------------------------------------------------------
# Autocast: the same dtypes from every backend
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_backend_returns_the_same_dtypes_under_autocast(dtype):
    x = torch.randint(0, V, (7, 2))
    seen = {}
    backends = ["reference", "torch"] + (TRITON if dtype == torch.float16 else [])
    for backend in backends:
        model = perturbed_model(12, backend=backend)
        with torch.autocast("cpu", dtype=dtype):
            h, hidden, mems, _, _ = model(x)
            h2, hidden2, mems2, _, _ = model(x, hidden=hidden, mems=mems)  # the state is taken back
        seen[backend] = (h2.dtype, [t.dtype for pair in hidden2 for t in pair],
                         [m.dtype for m in mems2 if torch.is_tensor(m)])
    assert len(set(map(str, seen.values()))) == 1, seen


# ---------------------------------------------------------------------------------------------------
# CPUs whose oneDNN cannot run a reduced-precision LSTM (AVX2 without AVX-512, for instance)
# ---------------------------------------------------------------------------------------------------
def test_auto_falls_back_when_this_cpu_cannot_run_the_torch_lstm(monkeypatch):
    reason = "torch.lstm cannot run torch.bfloat16 on this CPU (simulated); use backend='reference'"
    monkeypatch.setattr(lstm_torch_native, "cpu_lstm_failure", lambda dtype, needs_grad: reason)
    model = perturbed_model(13)
    x = torch.randint(0, V, (5, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model(x)[0]
        assert torch.isfinite(h).all()
        assert "lstm: reference" in sharnn_fast.explain() and "simulated" in sharnn_fast.explain()
        model.backend = "torch"
        with pytest.raises(BackendUnavailableError, match="backend 'torch' cannot run lstm: .*simulated"):
            model(x)
    model(x)  # float32 is not affected


_ON_AN_AVX2_CPU = """
import torch, sharnn_fast
from sharnn_fast import SHARNN
torch.manual_seed(0)
x = torch.randint(0, 10, (6, 2))
for dtype in (torch.bfloat16, torch.float16):
    for backend in (None, "torch", "reference"):
        model = SHARNN("LSTM", 10, 16, 32, 3, backend=backend)
        with torch.autocast("cpu", dtype=dtype):
            h = model(x)[0]
            loss = model.decoder(h).float().logsumexp(-1).mean()
        loss.backward()
        assert torch.isfinite(h).all(), (dtype, backend)
print("ok")
"""


def test_reduced_precision_runs_when_onednn_is_limited_to_avx2():
    """oneDNN limited to AVX2, as on a CPU without AVX-512: the model trains under bf16 and fp16
    autocast with the default backend and with every CPU backend (in a fresh process, since oneDNN
    reads the limit once)."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    done = subprocess.run([sys.executable, "-c", _ON_AN_AVX2_CPU], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_compile_traces_a_training_step_with_dropout_in_one_graph():
    """fullgraph: no graph break anywhere, dropout included (the torch Boom's fast mask uses
    random_ over int64, which the tracer refuses; while compiling it draws uniform floats)."""
    model = SHARNN("LSTM", V, D, F, 2, 0.2, 0.2, 0.2, backend="torch").train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randint(0, V, (6, 2))
    h = compiled(x)[0]
    h.sum().backward()
    assert torch.isfinite(h).all() and model.blocks[0].ff.linear1.weight.grad is not None
