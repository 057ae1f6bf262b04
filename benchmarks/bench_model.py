"""One SHARNN training step (forward, loss on decoder(h), backward) per backend, next to the
published model's eager computation (nn.LSTM, explicit attention, unfused Boom), the baseline.

GPU: the paper's size under bf16 autocast, with a memory of 5000 - T positions. CPU: a small size
in float32 (see conftest.MODEL_SIZES)."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from conftest import synchronize
from published_sharnn import PublishedSHARNN
from sharnn_fast import SHARNN

VARIANTS = ["published", "reference", "torch", "auto"]
DROPOUT = 0.1  # the paper's setting for every dropout


def build(variant, size, device):
    args = ("LSTM", size["ntoken"], size["ninp"], size["nhid"], size["nlayers"])
    kwargs = dict(dropout=DROPOUT, dropouth=DROPOUT, dropouti=DROPOUT)
    if variant == "published":
        model = PublishedSHARNN(*args, **kwargs)
    else:
        model = SHARNN(*args, **kwargs, backend=variant)
    return model.to(device).train()


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step(benchmark, record, variant, model_size, device):
    size = model_size
    torch.manual_seed(0)
    model = build(variant, size, device)
    T, B = size["T"], size["B"]
    x = torch.randint(0, size["ntoken"], (T + 1, B), device=device)
    inputs, targets = x[:-1], x[1:]
    mems = None
    if size["memory"]:
        attn = [b.attn is not None for b in model.blocks]
        mems = [torch.randn(size["memory"], B, size["ninp"], device=device) if a else [] for a in attn]
    dtype = getattr(torch, size["dtype"])
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())

    def step():
        model.zero_grad(set_to_none=True)
        with autocast:
            h = model(inputs, mems=mems)[0]
            logits = model.decoder(h)
        F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1)).backward()
        synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.group = "model train step"
    benchmark.pedantic(step, rounds=size["rounds"], warmup_rounds=1, iterations=1)
    record("model train step", variant, tokens=T * B, baseline=variant == "published",
           size={k: v for k, v in size.items() if k != "rounds"})
