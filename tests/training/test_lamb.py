"""LAMB against an independent float64 formula, the schedule, and the random sequence lengths."""
import math

import pytest
import torch

from sharnn_fast.training.loop import draw_sequence_length
from sharnn_fast.training.optim import Lamb, build_optimizer, learning_rate


def lamb_float64(weights, grads_per_step, *, lr, betas, eps, weight_decay, min_trust, max_weight_norm=10.0):
    """LAMB written out element by element in Python floats (float64): You et al. 2019,
    Algorithm 2, without bias correction; the "minimum trust" form of the published SHA-RNN
    (Merity 2019): min(||w||, 10) / ||u||, 1 where either norm is 0, floored at min_trust."""
    w = list(weights)
    m, v = [0.0] * len(w), [0.0] * len(w)
    for grads in grads_per_step:
        update = []
        for i, g in enumerate(grads):
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            update.append(m[i] / (math.sqrt(v[i]) + eps) + weight_decay * w[i])
        w_norm = math.sqrt(sum(x * x for x in w))
        u_norm = math.sqrt(sum(u * u for u in update))
        trust = max(min(w_norm, max_weight_norm) / u_norm, min_trust) if w_norm > 0 and u_norm > 0 else 1.0
        w = [x - lr * trust * u for x, u in zip(w, update)]
    return w


# Weight norms about 5 and 3.6 (below the clamp at 10), about 30 and 18 (above it: the clamp
# decides the step), tiny (trust floored at min_trust) and 0 (trust 1).
@pytest.mark.parametrize("scale", [1.0, 5.0, 1e-3, 0.0])
def test_lamb_matches_the_float64_formula(scale):
    gen = torch.Generator().manual_seed(1)
    shapes = [(7, 5), (13,)]  # two tensors: the trust ratio is per tensor
    weights = [torch.randn(s, generator=gen, dtype=torch.float64) * scale for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(4)]
    hyper = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01, min_trust=0.25)
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizer = Lamb(params, **hyper)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
    for k, (p, w0) in enumerate(zip(params, weights)):
        expected = lamb_float64(w0.flatten().tolist(), [g[k].flatten().tolist() for g in grads], **hyper)
        torch.testing.assert_close(p.detach().flatten(), torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-12, atol=1e-14)


def test_lamb_clamps_the_weight_norm_at_10():
    """A LayerNorm gain of 1024 ones (norm 32) as in the paper's preset: its first step uses
    min(32, 10) / ||u||, a third of the unclamped step; math.inf gives the unclamped rule."""
    gains = {c: torch.nn.Parameter(torch.ones(1024, dtype=torch.float64)) for c in (10.0, math.inf)}
    for clamp, p in gains.items():
        p.grad = torch.linspace(-1, 1, 1024, dtype=torch.float64)
        Lamb([p], lr=0.01, betas=(0.99, 0.999), weight_decay=0.0, max_weight_norm=clamp).step()
    update = torch.linspace(-1, 1, 1024, dtype=torch.float64)  # ||u|| about 10: trust above the floor
    update = 0.01 * update / ((0.001 * update ** 2).sqrt() + 1e-6)
    for clamp, p in gains.items():
        trust = min(32.0, clamp) / torch.linalg.vector_norm(update).item()
        torch.testing.assert_close(p.detach(), 1 - 0.01 * trust * update, rtol=1e-12, atol=1e-14)


def test_an_old_lamb_state_dict_resumes_under_the_clamp():
    """Checkpoints of sharnn_fast 0.1 hold LAMB groups without max_weight_norm: they load and
    continue with the published clamp at 10."""
    p = torch.nn.Parameter(torch.ones(4))
    state = Lamb([p]).state_dict()
    del state["param_groups"][0]["max_weight_norm"]
    optimizer = Lamb([p])
    optimizer.load_state_dict(state)
    assert optimizer.param_groups[0]["max_weight_norm"] == 10.0


def test_lamb_floors_the_trust_ratio_and_skips_params_without_grad():
    w = torch.nn.Parameter(torch.full((4,), 1e-3))  # ||w|| / ||u|| far below 0.25
    untouched = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.ones(4)
    Lamb([w, untouched], lr=0.1, weight_decay=0.0).step()
    update = 0.1 / (0.001 ** 0.5 + 1e-6)  # Adam's first update without bias correction
    torch.testing.assert_close(w.detach(), torch.full((4,), 1e-3 - 0.1 * 0.25 * update))
    assert torch.equal(untouched.detach(), torch.ones(3))


def test_lamb_rejects_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="lr"):
        Lamb(p, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        Lamb(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="max_weight_norm"):
        Lamb(p, max_weight_norm=0.0)


def test_other_optimizers_and_unknown_name():
    p = [torch.nn.Parameter(torch.ones(2))]
    assert isinstance(build_optimizer("adamw", p, lr=1e-3, weight_decay=0.0), torch.optim.AdamW)
    assert isinstance(build_optimizer("sgd", p, lr=1e-3, weight_decay=0.0), torch.optim.SGD)
    assert build_optimizer("lamb", p, lr=1e-3, weight_decay=0.0).defaults["min_trust"] == 0.25
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer("adam", p, lr=1e-3, weight_decay=0.0)


def test_learning_rate_schedule():
    kw = dict(lr=2e-3, warmup=800)
    assert learning_rate(1, **kw) == pytest.approx(2e-3 / 800)
    assert learning_rate(400, **kw) == pytest.approx(1e-3)
    assert learning_rate(800, **kw) == learning_rate(50_000, **kw) == 2e-3  # the published: constant
    assert learning_rate(900, **kw, epoch=2, when=(2,)) == pytest.approx(2e-4)  # after epoch 2 (1-based)
    assert learning_rate(900, **kw, epoch=1, when=(2,)) == 2e-3
    cosine = dict(kw, schedule="cosine", total_steps=1800)
    assert learning_rate(1300, **cosine) == pytest.approx(1e-3)
    assert learning_rate(1800, **cosine) == pytest.approx(0.0, abs=1e-12)


def test_sequence_lengths_follow_the_published_rule():
    gen = torch.Generator().manual_seed(0)
    lengths = [draw_sequence_length(100, gen) for _ in range(4000)]
    assert min(lengths) >= 5 and max(lengths) <= 100
    half = [n for n in lengths if n < 75]
    assert 0.03 < len(half) / len(lengths) < 0.07  # bptt / 2 with probability 0.05
    assert 40 < sum(half) / len(half) < 52  # around 50, Normal with std 5
    again = torch.Generator().manual_seed(0)
    assert [draw_sequence_length(100, again) for _ in range(4000)] == lengths  # reproducible
    assert {draw_sequence_length(3, gen) for _ in range(50)} == {3}  # capped at bptt below 5
