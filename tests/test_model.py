"""sharnn_fast.SHARNN against the model contract (docs/model.md) and against an independent implementation of the
published model (tests/published_sharnn.py)."""
import math

import pytest
import torch

from published_sharnn import PublishedSHARNN
from sharnn_fast import SHARNN
from tolerances import assert_close

NTOKEN, NINP, NHID = 50, 16, 48
BACKENDS = ["reference", "torch"]


def make_pair(nlayers=3, attn_every_layer=False, seed=0, **kwargs):
    """Our model and the published one, built from the same seed (hence the same weights)."""
    torch.manual_seed(seed)
    ours = SHARNN("LSTM", NTOKEN, NINP, NHID, nlayers, attn_layers="all" if attn_every_layer else None, **kwargs)
    torch.manual_seed(seed)
    published = PublishedSHARNN("LSTM", NTOKEN, NINP, NHID, nlayers, attn_every_layer=attn_every_layer,
                                tie_weights=kwargs.get("tie_weights", False))
    return ours, published


def perturb_(ours, published):
    """Move every parameter away from its initial value (LayerNorms of 1 and 0 and gates of 0 would
    hide a swapped LayerNorm or gate), identically in both models."""
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.2 * p.std().nan_to_num(0.0).clamp_min(0.1) * torch.randn_like(p))
    published.load_state_dict(ours.state_dict(), strict=True)


def tokens(T, B, device="cpu"):
    return torch.randint(0, NTOKEN, (T, B), device=device)


def expected_shapes(nlayers, attn_blocks, d=NINP, F=NHID, V=NTOKEN):
    shapes = {"encoder.weight": [V, d], "decoder.weight": [V, d], "decoder.bias": [V]}
    for i in range(nlayers):
        p = f"blocks.{i}."
        for ln in ("lnstart", "lnmid", "lnmem", "lnout", "lnff", "lnxff"):
            shapes[p + ln + ".weight"] = shapes[p + ln + ".bias"] = [d]
        shapes.update({p + "rnn.weight_ih_l0": [4 * d, d], p + "rnn.weight_hh_l0": [4 * d, d],
                       p + "rnn.bias_ih_l0": [4 * d], p + "rnn.bias_hh_l0": [4 * d],
                       p + "ff.linear1.weight": [F, d], p + "ff.linear1.bias": [F]})
        if i in attn_blocks:
            a = p + "attn."
            shapes.update({a + "qs": [1, 1, d], a + "ks": [1, 1, d], a + "vs": [1, 1, d],
                           a + "qkvs": [1, 3, d], a + "r_gate": [1, 1, d], a + "q.weight": [d, d],
                           a + "q.bias": [d], a + "qln.weight": [d], a + "qln.bias": [d],
                           a + "vq.l1.weight": [2 * d, d], a + "vq.l1.bias": [2 * d]})
    return shapes


@pytest.mark.parametrize("nlayers, attn_layers, attn_blocks", [
    (4, None, {2}), (1, None, set()), (3, "all", {0, 1, 2}), (4, [0, 3], {0, 3})])
def test_parameter_names_and_shapes(nlayers, attn_layers, attn_blocks):
    model = SHARNN("LSTM", NTOKEN, NINP, NHID, nlayers, attn_layers=attn_layers)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(nlayers, attn_blocks)
    assert list(model.buffers()) == []
    assert (model.ninp, model.nhid, model.nlayers) == (NINP, NHID, nlayers)
    assert (model.num_max_positions, model.num_heads, model.causal) == (5000, 1, True)


def test_attributes_and_dropouts():
    model = SHARNN("LSTM", NTOKEN, NINP, NHID, 3, dropout=0.1, dropouth=0.2, dropouti=0.3)
    assert (model.drop.p, model.idrop.p, model.hdrop.p) == (0.1, 0.3, 0.2)
    block = model.blocks[1]
    assert block.drop.p == block.ff.dropout.p == block.attn.drop.p == 0.2


def test_same_seed_gives_the_published_initialisation():
    ours, published = make_pair(nlayers=4)
    theirs = published.state_dict()
    for name, value in ours.state_dict().items():
        assert torch.equal(value, theirs[name]), name


def test_initialisation_follows_the_spec():
    model = SHARNN("LSTM", 1000, 64, 128, 3)
    std = 0.1 / math.sqrt(64)
    for name, p in model.named_parameters():
        if name.endswith(("encoder.weight", "decoder.weight", "q.weight", "l1.weight", "linear1.weight")):
            assert abs(p.std().item() - std) < 0.1 * std and abs(p.mean().item()) < 0.1 * std, name
        elif name.endswith(("decoder.bias", "q.bias", "l1.bias", "linear1.bias")):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif ".ln" in name or "qln" in name:
            assert torch.equal(p, torch.full_like(p, 1.0 if name.endswith("weight") else 0.0)), name
        elif "rnn." in name:  # nn.LSTM's default: uniform(-1/sqrt(H), 1/sqrt(H))
            assert p.abs().max().item() <= 1 / math.sqrt(64) and p.std().item() > 0.5 / math.sqrt(3 * 64), name
        elif name.endswith(("qs", "ks", "vs", "qkvs")):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif name.endswith("r_gate"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            raise AssertionError(f"parameter {name} not covered by the spec")


def test_tie_weights_shares_one_parameter():
    model, published = make_pair(tie_weights=True)
    assert model.decoder.weight is model.encoder.weight
    assert "decoder.weight" in model.state_dict()
    published.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("attn_every_layer", [False, True])
def test_state_dict_round_trip(attn_every_layer):
    ours, published = make_pair(attn_every_layer=attn_every_layer, seed=1)
    _, other = make_pair(attn_every_layer=attn_every_layer, seed=2)
    ours.load_state_dict(other.state_dict(), strict=True)
    for name, value in ours.state_dict().items():
        assert torch.equal(value, other.state_dict()[name])
    published.load_state_dict(ours.state_dict(), strict=True)
    fresh = SHARNN("LSTM", NTOKEN, NINP, NHID, 3, attn_layers="all" if attn_every_layer else None)
    fresh.load_state_dict(ours.state_dict(), strict=True)


def flat_results(output, model):
    """Every tensor a forward returns (h, each hidden h and c, each memory) plus every gradient."""
    h, new_hidden, new_mems = output[:3]
    tensors = {"h": h}
    for i, (hh, cc) in enumerate(new_hidden):
        tensors[f"hidden[{i}].h"], tensors[f"hidden[{i}].c"] = hh, cc
    for i, m in enumerate(new_mems):
        if torch.is_tensor(m):
            tensors[f"mems[{i}]"] = m
    gen = torch.Generator().manual_seed(99)
    loss = model.decoder(h).logsumexp(-1).sum()
    for name, t in tensors.items():
        loss = loss + (t * torch.randn(t.shape, generator=gen)).sum()
    loss.backward()
    tensors.update({"grad " + n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    return tensors


@pytest.mark.parametrize("attn_every_layer", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_published_model_outputs_state_and_gradients(backend, attn_every_layer):
    """Eval mode, a second segment with hidden and memory carried from the first."""
    ours, published = make_pair(attn_every_layer=attn_every_layer, backend=backend)
    perturb_(ours, published)
    ours.eval(), published.eval()
    first, second = tokens(11, 3), tokens(7, 3)
    with torch.no_grad():
        _, hidden, mems, _, _ = published(first)
    got = flat_results(ours(second, hidden=hidden, mems=mems), ours)
    expected = flat_results(published(second, hidden=hidden, mems=mems), published)
    assert got.keys() == expected.keys()
    for name in expected:
        assert_close(got[name], expected[name], name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_segments_equal_one_pass(backend):
    torch.manual_seed(3)
    model = SHARNN("LSTM", NTOKEN, NINP, NHID, 3, attn_layers="all", backend=backend).eval()
    x = tokens(20, 2)
    with torch.no_grad():
        whole, hidden_whole, mems_whole = model(x, return_h=False)
        a, hidden, mems = model(x[:13], return_h=False)
        # Training code detaches between segments, turning lists into tuples.
        hidden = tuple((h.detach(), c.detach()) for h, c in hidden)
        mems = tuple(m.detach() for m in mems)
        b, hidden_b, mems_b = model(x[13:], hidden=hidden, mems=mems, return_h=False)
    assert_close(torch.cat([a, b]), whole, name="h")
    for (h1, c1), (h2, c2) in zip(hidden_b, hidden_whole):
        assert_close(h1, h2, name="hidden h"), assert_close(c1, c2, name="hidden c")
    for m1, m2 in zip(mems_b, mems_whole):
        assert_close(m1, m2, name="memory")


def test_blocks_without_attention_return_empty_memory_and_accept_it_back():
    model = SHARNN("LSTM", NTOKEN, NINP, NHID, 3).eval()
    _, hidden, mems = model(tokens(5, 2), return_h=False)
    assert mems[0] == [] and mems[2] == [] and torch.is_tensor(mems[1])
    assert isinstance(hidden, list) and all(isinstance(p, tuple) for p in hidden)
    detached = tuple(m.detach() if torch.is_tensor(m) else () for m in mems)
    h, _, new_mems = model(tokens(4, 2), hidden=hidden, mems=detached, return_h=False)
    assert new_mems[1].shape == (9, 2, NINP)
    # mems=[] and hidden=[] mean "none", as in the published `if mems` / `if hidden` tests.
    model(tokens(4, 2), hidden=[], mems=[])


def test_memory_is_capped_at_5000_positions():
    ours, published = make_pair(nlayers=2)
    perturb_(ours, published)
    ours.eval(), published.eval()
    B, T = 1, 20
    for M in (4990, 5000):
        mems = [torch.randn(M, B, NINP), []]  # with 2 blocks, block 0 has the attention
        x = tokens(T, B)
        with torch.no_grad():
            h, _, new_mems = ours(x, mems=mems, return_h=False)
            h_pub, _, new_mems_pub = published(x, mems=mems, return_h=False)
        assert new_mems[0].shape[0] == 5000
        assert_close(new_mems[0], new_mems_pub[0], name="memory")
        assert_close(h, h_pub, name="h")
        # The memory seen was the last 5000 - T positions of what was passed.
        torch.testing.assert_close(new_mems[0][:5000 - T], mems[0][M - (5000 - T):])


def test_vq_collapse_keeps_outputs():
    torch.manual_seed(4)
    model = SHARNN("LSTM", NTOKEN, NINP, NHID, 3, attn_layers="all").eval()
    with torch.no_grad():
        for block in model.blocks:  # move the gates away from their zero initialisation
            block.attn.vs.normal_()
            block.attn.vq.l1.weight.normal_()
    x = tokens(9, 2)
    with torch.no_grad():
        before = model(x)[0]
        model.vq_collapse()
        after = model(x)[0]
    assert_close(after, before, name="h after vq_collapse")
    assert not any(".vq." in k for k in model.state_dict())
    model.vq_collapse()  # a second call changes nothing
    with torch.no_grad():
        assert_close(model(x)[0], before, name="h after a second vq_collapse")


class _ListMemory:
    """The simplest memory for Block.step: a tensor the row is concatenated to."""

    def __init__(self, mem):
        self.mem = mem

    def append(self, row):
        self.mem = torch.cat([self.mem, row.unsqueeze(0)])
        return self.mem, None


@pytest.mark.parametrize("collapsed", [False, True])
def test_block_step_is_forward_on_one_position(collapsed):
    """Block.step (and the LSTM, attention and Boom steps it is made of) computes what forward
    computes for T = 1, with the gates computed at the step or given."""
    ours, published = make_pair(attn_every_layer=True, seed=5)
    perturb_(ours, published)
    ours.eval()
    if collapsed:
        ours.vq_collapse()
    block = ours.blocks[0]
    B, M = 3, 7
    x, mem = torch.randn(1, B, NINP), torch.randn(M, B, NINP)
    hidden = (torch.randn(1, B, NINP), torch.randn(1, B, NINP))
    with torch.no_grad():
        y, new_mem, (h, c), _ = block(x, mem=mem, hidden=hidden, backend="reference")
        for gates in (None, block.attn.gates()):
            memory = _ListMemory(mem)
            y_step, (h_step, c_step) = block.step(x[0], (hidden[0][0], hidden[1][0]), memory, gates)
            assert_close(y_step, y[0], name="y")
            assert_close(h_step, h[0], name="h")
            assert_close(c_step, c[0], name="c")
            assert_close(memory.mem, new_mem, name="memory")


def test_train_mode_dropout_and_backward_run():
    model = SHARNN("LSTM", NTOKEN, NINP, NHID, 3, dropout=0.1, dropouth=0.1, dropouti=0.1).train()
    x = tokens(8, 2)
    h1 = model(x)[0]
    model.decoder(h1).sum().backward()
    # Exactly the parameters the spec calls unused get no gradient.
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    unused = {n for n, _ in model.named_parameters()
              if n.endswith(("qkvs", "r_gate")) or ".lnout." in n
              or (n.startswith(("blocks.0.ln", "blocks.2.ln")) and (".lnmid." in n or ".lnmem." in n))}
    assert no_grad == unused
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert not torch.allclose(h1, model(x)[0])  # dropout is active


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_on_cpu(backend):
    torch.manual_seed(5)
    model = SHARNN("LSTM", NTOKEN, NINP, NHID, 3, backend=backend).eval()
    x = tokens(12, 2)
    expected = model(x)[0].detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, hidden, mems, _, _ = model(x)
        loss = model.decoder(h).float().logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(h).all() and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert_close(h.float(), expected, tolerance=5e-2, name="bf16 autocast h")


def test_return_h_false_returns_three_items():
    out = SHARNN("LSTM", NTOKEN, NINP, NHID, 2)(tokens(3, 1), return_h=False)
    assert len(out) == 3
    out = SHARNN("LSTM", NTOKEN, NINP, NHID, 2)(tokens(3, 1))
    assert len(out) == 5 and out[3] is None and out[4] is None


def test_padding_mask_is_ignored_with_a_warning():
    model = SHARNN("LSTM", NTOKEN, NINP, NHID, 2).eval()
    x = tokens(3, 1)
    with pytest.warns(UserWarning, match="ignores padding_mask"):
        h = model(x, padding_mask=torch.zeros(3, 1, dtype=torch.bool))[0]
    torch.testing.assert_close(h, model(x)[0])


def _state(B, nlayers=3, d=NINP):
    return [(torch.zeros(1, B, d), torch.zeros(1, B, d)) for _ in range(nlayers)]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(x=torch.randn(4, 2)), TypeError, "integer token ids"),
    (dict(x=torch.randint(0, NTOKEN, (4,))), ValueError, r"shape \[T, B\]"),
    (dict(x=torch.randint(0, NTOKEN, (0, 2))), ValueError, "at least one time step"),
    (dict(x=torch.randint(0, NTOKEN, (4, 2), device="meta")), ValueError, "x is on meta"),
    (dict(hidden=_state(3)), ValueError, r"hidden\[0\]\[0\] has batch size 3 but x has batch size 2"),
    (dict(hidden=_state(2, nlayers=2)), ValueError, "one \\(h, c\\) pair per block"),
    (dict(hidden=[(torch.zeros(1, 2, NINP),)] * 3), TypeError, r"hidden\[0\] must be an \(h, c\) pair"),
    (dict(hidden=[(torch.zeros(1, 2, NINP + 1), torch.zeros(1, 2, NINP))] * 3), ValueError, "ninp=16"),
    (dict(hidden=torch.zeros(3, 2, NINP)), TypeError, "hidden must be a list or tuple"),
    (dict(mems=[[], torch.zeros(5, 3, NINP), []]), ValueError, r"mems\[1\] has batch size 3"),
    (dict(mems=[[], [], []]), TypeError, r"mems\[1\] must be a tensor"),
    (dict(mems=[[], torch.zeros(5, 2, NINP)]), ValueError, "one entry per block"),
    (dict(mems=[[], torch.zeros(5, NINP), []]), ValueError, r"mems\[1\] must have shape"),
])
def test_bad_inputs_raise_clear_errors(kwargs, error, match):
    model = SHARNN("LSTM", NTOKEN, NINP, NHID, 3)
    kwargs.setdefault("x", tokens(4, 2))
    with pytest.raises(error, match=match):
        model(**kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(nhid=40), ValueError, "nhid must be a multiple of ninp"),
    (dict(attn_layers=[3]), ValueError, "outside 0 .. 2"),
    (dict(attn_layers="some"), TypeError, "attn_layers must be"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
    (dict(ninp=0), ValueError, "ninp must be a positive integer"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    args = dict(ntoken=NTOKEN, ninp=NINP, nhid=NHID, nlayers=3)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        SHARNN("LSTM", **args)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_published_model_on_gpu(backend):
    ours, published = make_pair(backend=backend)
    perturb_(ours, published)
    ours, published = ours.cuda().eval(), published.cuda().eval()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        x = tokens(13, 3, device="cuda")
        got, expected = ours(x)[0], published(x)[0]
    finally:
        torch.backends.cudnn.allow_tf32 = True
    assert_close(got, expected, tolerance="tf32", name="h on GPU")


def test_torch_compile_fullgraph_matches_eager():
    model = SHARNN("LSTM", NTOKEN, NINP, NHID, 3, backend="torch").eval()
    x = tokens(6, 2)
    with torch.no_grad():
        expected = model(x)[0]
        got = torch.compile(model, fullgraph=True)(x)[0]
    assert_close(got, expected, name="compiled h")
