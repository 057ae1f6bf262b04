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

from published_sharnn import PublishedSHARNN
from sharnn_fast import SHARNN, BackendUnavailableError

# Each case times its variants interleaved against "published". torch.compile has cases of its own,
# next to the published model and the eager "torch" backend it compiles, so that
# `-k "not compile"` leaves all of it out.
EAGER_VARIANTS = ["published", "reference", "torch", "triton", "cuda", "auto"]
COMPILED_VARIANTS = ["published", "torch", "torch+compile"]
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

    def why_not(self):
        """Why this variant cannot run here (its backend's own message), or None."""
        try:
            with torch.no_grad():
                self.logits()
        except BackendUnavailableError as err:
            return str(err)
        return None


def train_step(case):
    """One training step of ``case``'s model: forward, cross-entropy on decoder(h), backward, SGD."""
    case.model.train()
    optimizer = torch.optim.SGD(case.model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = case.logits()
        F.cross_entropy(logits.float().view(-1, logits.shape[-1]), case.targets.reshape(-1)).backward()
        optimizer.step()
    return step


def inference_segment(case):
    """One segment of evaluation: forward and decoder, no grad."""
    case.model.eval()

    def segment():
        with torch.no_grad():
            case.logits()
    return segment


def compare_variants(bench, variants, attn, mode, size, device):
    """Build every variant's model at ``size`` (same seed), time them interleaved against the
    published model and record the case."""
    compiled = any(v.endswith("+compile") for v in variants)
    if compiled and device.type == "cpu" and not bench.timing:
        pytest.skip("compiling the model takes minutes on a small CPU: only when timing")
    runs, skipped = {}, {}
    for variant in variants:
        case = Case(variant, attn, size, device)
        reason = case.why_not()
        if reason is not None:
            skipped[variant] = reason
            continue
        runs[variant] = train_step(case) if mode == "train" else inference_segment(case)
    tokens, flops = size["T"] * size["B"], forward_flops(size, case.attn_blocks)
    # The recurrences are sequential: nlayers x T dependent steps forward, as many again backward.
    steps = size["nlayers"] * size["T"]
    work = dict(tokens=tokens, flops=3 * flops, steps=2 * steps) if mode == "train" else \
        dict(tokens=tokens, flops=flops, steps=steps)
    name = f"model train step ({attn} attention)" if mode == "train" else "model inference segment"
    bench.compare(name + (", compiled" if compiled else ""), runs, baseline="published",
                  size=dict(size, attention=attn), work=work, skipped=skipped, budget="model")


@pytest.mark.parametrize("attn", ["single", "all"])
def test_train_step(bench, attn, model_size, device):
    if attn not in attention_layouts(device):
        pytest.skip("attention in every layer is benchmarked on GPU only")
    compare_variants(bench, EAGER_VARIANTS, attn, "train", model_size, device)


@pytest.mark.parametrize("attn", ["single", "all"])
def test_train_step_compiled(bench, attn, model_size, device):
    if attn not in attention_layouts(device):
        pytest.skip("attention in every layer is benchmarked on GPU only")
    compare_variants(bench, COMPILED_VARIANTS, attn, "train", model_size, device)


def test_inference_segment(bench, model_size, device):
    compare_variants(bench, EAGER_VARIANTS, "single", "inference", model_size, device)


def test_inference_segment_compiled(bench, model_size, device):
    compare_variants(bench, COMPILED_VARIANTS, "single", "inference", model_size, device)
