"""The whole model: one training step (forward, cross-entropy on decoder(h), backward, optimizer
step) and one inference segment, per variant, next to the published model's eager computation
(nn.LSTM, explicit matmul-softmax attention, unfused Boom: tests/published_sharnn.py), the
baseline; and torch.compile of the published model and of ours in cases of their own, each
compiled variant's compile time (its first call, forward and backward graphs) in the row's notes,
apart from the step time.

GPU: the paper's size (emsize 1024, nhid 4096, 4 layers, T 1024, B 16, a memory of 5000 - T
positions), single-head and attention in every layer. The baseline is the published model in its
own recipe, fp16 autocast with a GradScaler; the other variants are listed in GPU_EAGER (bf16 autocast
unless named). CPU: a small size in float32 (see conftest.MODEL_SIZES), against the published model
in float32."""
import contextlib
import time
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from published_sharnn import PublishedSHARNN
from conftest import Variant, synchronize
from sharnn_fast import SHARNN, BackendUnavailableError, autotune_model, autotuning
from sharnn_fast.training.loop import autotuning_on


@dataclass(frozen=True)
class Spec:
    """One variant: whose model ("published", or our model with this backend), the autocast dtype
    (None: the case's), whether "auto" runs with its choices autotuned first (autotune_model), and
    whether torch.compile wraps the model."""
    name: str
    model: str
    dtype: Optional[str] = None
    tuned: bool = False
    compiled: bool = False


# The comparison a GPU user makes, at the paper's size: the published model in its own recipe (fp16
# autocast, as apex O1) and under bf16 autocast (where its nn.LSTM still runs in fp16: PyTorch's
# autocast casts cuDNN RNNs to fp16 whatever the autocast dtype), "auto" in bf16, "auto" after
# autotune_model, every backend forced, and "auto fp16", `sharnn train`'s GPU default, where "auto"
# takes cuDNN's persistent LSTM (fp16 only). The step-by-step reference takes seconds a step at that
# size and is timed on CPU only.
GPU_EAGER = [Spec("published fp16", "published", "float16"), Spec("published bf16", "published", "bfloat16"),
             Spec("auto", "auto"), Spec("auto autotuned", "auto", tuned=True), Spec("torch", "torch"),
             Spec("triton", "triton"), Spec("cuda", "cuda"), Spec("auto fp16", "auto", "float16")]
CPU_EAGER = [Spec("published", "published"), Spec("reference", "reference"), Spec("torch", "torch"),
             Spec("triton", "triton"), Spec("cuda", "cuda"), Spec("auto", "auto"),
             Spec("auto autotuned", "auto", tuned=True)]
# torch.compile: what a user tries first (the published model compiled) next to the published model
# and ours, eager and compiled. Its own cases, so that `-k "not compile"` leaves all of it out.
COMPILED = [Spec("published", "published"), Spec("published+compile", "published", compiled=True),
            Spec("auto", "auto"), Spec("auto+compile", "auto", compiled=True)]
BASELINE = {"cuda": "published fp16", "cpu": "published"}
DROPOUT = 0.1  # the paper's setting for every dropout


def eager_specs(device):
    return GPU_EAGER if device.type == "cuda" else CPU_EAGER


def attention_layouts(device):
    return ["single", "all"] if device.type == "cuda" else ["single"]


def build(spec, attn, size, device):
    args = ("LSTM", size["ntoken"], size["ninp"], size["nhid"], size["nlayers"])
    kwargs = dict(dropout=DROPOUT, dropouth=DROPOUT, dropouti=DROPOUT)
    if spec.model == "published":
        model = PublishedSHARNN(*args, **kwargs, attn_every_layer=attn == "all")
    else:
        model = SHARNN(*args, **kwargs, attn_layers="all" if attn == "all" else None, backend=spec.model)
    return model.to(device)


def forward_flops(size, attn_blocks):
    """Matrix-multiply FLOPs of one forward pass over T x B tokens."""
    d, F_, V, T, M = size["ninp"], size["nhid"], size["ntoken"], size["T"], size["memory"]
    per_token = size["nlayers"] * (16 * d * d + 2 * d * F_) + 2 * d * V
    keys_seen = M + (T + 1) / 2  # causal: query i sees the memory and i + 1 current positions
    per_token += attn_blocks * (2 * d * d + 4 * d * keys_seen)
    return per_token * T * size["B"]


class Case:
    """A variant's model, inputs and memory, ready to time. Autotuning is on exactly while a
    ``tuned`` variant runs (autotuning is process-wide and the variants run interleaved)."""

    def __init__(self, spec, attn, size, device, mode):
        torch.manual_seed(0)
        self.spec, self.mode, self.device = spec, mode, device
        self.model = build(spec, attn, size, device)
        self.run = torch.compile(self.model) if spec.compiled else self.model
        T, B = size["T"], size["B"]
        x = torch.randint(0, size["ntoken"], (T + 1, B), device=device)
        self.inputs, self.targets = x[:-1], x[1:]
        self.attn_blocks = sum(b.attn is not None for b in self.model.blocks)
        self.mems = None
        if size["memory"]:
            self.mems = [torch.randn(size["memory"], B, size["ninp"], device=device)
                         if b.attn is not None else [] for b in self.model.blocks]
        self.dtype = getattr(torch, spec.dtype or size["dtype"])
        self.model.train(mode == "train")
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def tuning(self):
        """Autotuning on while a tuned variant runs; other variants leave the switch as it is (off
        unless the caller, e.g. bench_autotune.py, or SHARNN_FAST_AUTOTUNE turned it on)."""
        return autotuning_on(self.spec.tuned)

    def logits(self):
        with self.autocast():
            h = self.run(self.inputs, mems=self.mems)[0]
            return self.model.decoder(h)

    def prepare(self) -> Optional[str]:
        """Tune (a tuned variant), then run once: why this variant cannot run here (its backend's
        own message), or None."""
        try:
            if self.spec.tuned:
                with self.autocast(), contextlib.ExitStack() as stack:
                    if self.mode != "train":
                        stack.enter_context(torch.no_grad())
                    autotune_model(self.model, self.inputs, mems=self.mems)
                autotuning.autotune(None)
            if self.spec.compiled:
                return None  # the first timed call compiles, and its time is reported apart
            with self.tuning(), torch.no_grad():
                self.logits()
        except BackendUnavailableError as err:
            return str(err)
        return None


def train_step(case):
    """One training step of ``case``'s model: forward, cross-entropy on decoder(h), backward, SGD
    (through a GradScaler in fp16, as a float16 recipe needs)."""
    optimizer = torch.optim.SGD(case.model.parameters(), lr=1e-4)

    def step():
        with case.tuning():
            optimizer.zero_grad(set_to_none=True)
            logits = case.logits()
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), case.targets.reshape(-1))
            if case.scaler is None:
                loss.backward()
                optimizer.step()
            else:
                case.scaler.scale(loss).backward()
                case.scaler.step(optimizer)
                case.scaler.update()
    return step


def inference_segment(case):
    """One segment of evaluation: forward and decoder, no grad."""
    def segment():
        with case.tuning(), torch.no_grad():
            case.logits()
    return segment


def compare_variants(bench, specs, attn, mode, size, device):
    """Build every variant's model at ``size`` (same seed), time them interleaved against the
    published model and record the case."""
    compiled = any(spec.compiled for spec in specs)
    if compiled and device.type == "cpu" and not bench.timing:
        pytest.skip("compiling the model takes minutes on a small CPU: only when timing")
    runs, skipped = {}, {}
    baseline = BASELINE[device.type] if not compiled else "published"
    for spec in specs:
        case = Case(spec, attn, size, device, mode)
        reason = case.prepare()
        if reason is not None:
            skipped[spec.name] = reason
            continue
        dtype = str(case.dtype).removeprefix("torch.")
        run = train_step(case) if mode == "train" else inference_segment(case)
        info = None
        if spec.compiled:  # the first call compiles (in training, the forward and backward graphs)
            started = time.perf_counter()
            run()
            synchronize(device)
            info = dict(compile_s=round(time.perf_counter() - started, 1))
        runs[spec.name] = Variant(run, size=dict(dtype=dtype) if dtype != size["dtype"] else None, info=info)
        attn_blocks = case.attn_blocks
    tokens, flops = size["T"] * size["B"], forward_flops(size, attn_blocks)
    # The recurrences are sequential: nlayers x T dependent steps forward, as many again backward.
    steps = size["nlayers"] * size["T"]
    work = dict(tokens=tokens, flops=3 * flops, steps=2 * steps) if mode == "train" else \
        dict(tokens=tokens, flops=flops, steps=steps)
    name = f"model train step ({attn} attention)" if mode == "train" else "model inference segment"
    bench.compare(name + (", compiled" if compiled else ""), runs, baseline=baseline,
                  size=dict(size, attention=attn), work=work, skipped=skipped, budget="model")


@pytest.mark.parametrize("attn", ["single", "all"])
def test_train_step(bench, attn, model_size, device):
    if attn not in attention_layouts(device):
        pytest.skip("attention in every layer is benchmarked on GPU only")
    compare_variants(bench, eager_specs(device), attn, "train", model_size, device)


@pytest.mark.parametrize("attn", ["single", "all"])
def test_train_step_compiled(bench, attn, model_size, device):
    if attn not in attention_layouts(device):
        pytest.skip("attention in every layer is benchmarked on GPU only")
    compare_variants(bench, COMPILED, attn, "train", model_size, device)


def test_inference_segment(bench, model_size, device):
    compare_variants(bench, eager_specs(device), "single", "inference", model_size, device)


def test_inference_segment_compiled(bench, model_size, device):
    compare_variants(bench, COMPILED, "single", "inference", model_size, device)
