"""A short version of tools/convergence.py: the training loop with hidden state and memory carried
between segments, on real text, gives the same losses with every CPU backend, and learns."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import convergence  # noqa: E402


def test_backends_train_alike_on_real_text():
    data = torch.tensor(list(convergence.stdlib_docstrings(50_000)), dtype=torch.long)
    assert data.numel() == 50_000 and 3.0 < convergence.unigram_entropy_nats(data) < 3.6  # English bytes
    kwargs = dict(steps=30, device="cpu", dtype=torch.float32, ninp=32, nhid=64, bptt=24, batch=4, warmup=5)
    reference = convergence.train("reference", data, **kwargs)
    torch_losses = convergence.train("torch", data, **kwargs)
    assert max(abs(a - b) for a, b in zip(reference, torch_losses)) < 1e-3
    assert sum(reference[-5:]) / 5 < reference[0] - 1.0  # from ln(256) = 5.5 nats towards the text


def test_lamb_applies_the_minimum_trust_ratio():
    w = torch.nn.Parameter(torch.full((4,), 1e-3))  # tiny weights: trust ratio ||w|| / ||u|| << 0.25
    w.grad = torch.ones(4)
    convergence.Lamb([w], lr=0.1, weight_decay=0.0).step()
    # Adam's first update without bias correction: m / sqrt(v) = 0.1 / sqrt(0.001) per element.
    update = 0.1 / (0.001 ** 0.5 + 1e-6)
    torch.testing.assert_close(w.detach(), torch.full((4,), 1e-3 - 0.1 * 0.25 * update))
