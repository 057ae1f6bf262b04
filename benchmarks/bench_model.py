"""The whole model: one training step (forward, cross-entropy on decoder(h), backward, optimizer
step) and one inference segment, per backend, next to the published model's eager computation
(nn.LSTM, explicit matmul-softmax attention, unfused Boom: tests/published_sharnn.py), the
baseline, and torch.compile of the "torch" backend.

GPU: the paper's size under bf16 autocast, with a memory of 5000 - T positions, single-head and
attention in every layer. CPU: a small size in float32 (see conftest.MODEL_SIZES)."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from conftest import synchronize
from published_sharnn import PublishedSHARNN
from sharnn_fast import SHARNN, BackendUnavailableError

# torch.compile last: its compile workers must not disturb the timing of the eager variants.
VARIANTS = ["published", "reference", "torch", "triton", "cuda", "auto", "torch+compile"]
DROPOUT = 0.1  # the paper's setting for every dropout


def attention_layouts(device):
    return ["single", "all"] if device.type == "cuda" else ["single"]


def build(variant, attn, size, device):
    args = ("LSTM", size["ntoken"], size["ninp"], size["nhid"], size["nlayers"])
    kwargs = dict(dropout=DROPOUT, dropouth=DROPOUT, dropouti=DROPOUT)
    if variant == "published":
        model = PublishedSHARNN(*args, **kwargs, attn_every_layer=attn == "all")
    else:
        backend = variant.removesuffix("+compile")
        model = SHARNN(*args, **kwargs, attn_layers="all" if attn == "all" else None, backend=backend)
    return model.to(device)


def forward_flops(size, attn_blocks):
    """Matrix-multiply FLOPs of one forward pass over T x B tokens."""
    d, F_, V, T, M = size["ninp"], size["nhid"], size["ntoken"], size["T"], size["memory"]
    per_token = size["nlayers"] * (16 * d * d + 2 * d * F_) + 2 * d * V
    keys_seen = M + (T + 1) / 2  # causal: query i sees the memory and i + 1 current positions
    per_token += attn_blocks * (2 * d * d + 4 * d * keys_seen)
    return per_token * T * size["B"]


class Case:
    """A model, its inputs and its memory, ready to time."""

    def __init__(self, variant, attn, size, device):
        torch.manual_seed(0)
        self.model = build(variant, attn, size, device)
        self.run = torch.compile(self.model) if variant.endswith("+compile") else self.model
        T, B = size["T"], size["B"]
        x = torch.randint(0, size["ntoken"], (T + 1, B), device=device)
        self.inputs, self.targets = x[:-1], x[1:]
        self.attn_blocks = sum(b.attn is not None for b in self.model.blocks)
        self.mems = None
        if size["memory"]:
            self.mems = [torch.randn(size["memory"], B, size["ninp"], device=device)
                         if b.attn is not None else [] for b in self.model.blocks]
        dtype = getattr(torch, size["dtype"])
        self.autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                         else contextlib.nullcontext())
        self.device = device

    def logits(self):
        with self.autocast:
            h = self.run(self.inputs, mems=self.mems)[0]
            return self.model.decoder(h)

    def skip_unless_runnable(self, variant, request):
        if (variant.endswith("+compile") and self.device.type == "cpu"
                and request.config.getoption("benchmark_disable")):
            pytest.skip("compiling the model takes minutes on a small CPU: only when timing")
        try:
            with torch.no_grad():
                self.logits()
        except BackendUnavailableError as err:
            pytest.skip(str(err))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("attn", ["single", "all"])
def test_train_step(benchmark, record, request, variant, attn, model_size, device):
    if attn not in attention_layouts(device):
        pytest.skip("attention in every layer is benchmarked on GPU only")
    case = Case(variant, attn, model_size, device)
    case.model.train()
    case.skip_unless_runnable(variant, request)
    optimizer = torch.optim.SGD(case.model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = case.logits()
        F.cross_entropy(logits.float().view(-1, logits.shape[-1]), case.targets.reshape(-1)).backward()
        optimizer.step()
        synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    group = f"model train step ({attn} attention)"
    benchmark.group = group
    benchmark.pedantic(step, rounds=model_size["rounds"], warmup_rounds=2, iterations=1)
    size = model_size
    record(group, variant, tokens=size["T"] * size["B"], flops=3 * forward_flops(size, case.attn_blocks),
           steps=2 * size["nlayers"] * size["T"],  # the recurrences, forward and backward, are sequential
           baseline=variant == "published", size={k: v for k, v in size.items() if k != "rounds"})


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_segment(benchmark, record, request, variant, model_size, device):
    case = Case(variant, "single", model_size, device)
    case.model.eval()
    case.skip_unless_runnable(variant, request)

    def segment():
        with torch.no_grad():
            case.logits()
        synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    group = "model inference segment"
    benchmark.group = group
    benchmark.pedantic(segment, rounds=model_size["rounds"], warmup_rounds=2, iterations=1)
    size = model_size
    record(group, variant, tokens=size["T"] * size["B"], flops=forward_flops(size, case.attn_blocks),
           steps=size["nlayers"] * size["T"], baseline=variant == "published", size={k: v for k, v in size.items() if k != "rounds"})
