"""Generation: SHARNN.generate's prefill and one-token decode step against the published
generation loop (tests/published_sharnn.py, an eager model called on one token at a time with
hidden and mems carried, which concatenates the whole memory again at every token).

Per-token cases start every call from the same state (the prompt's), so every timed call does the
same work: a memory of P positions plus the new token. The per-token limit is reading every weight
once (all parameters but the embedding table, of which one row is read) and each attention
block's memory once, at the measured copy bandwidth.

The compiled step (``generate(compile=True)``: torch.compile of the static decoder's step) is a
case of its own, "generate decode per token B 1, compiled": the published loop, the eager step and
the compiled step, interleaved. The compile is paid before timing; its seconds are in the compiled
row's notes (``compile_s``), never in its time per token. Under --benchmark-disable on a CPU that
case is skipped (compiling would take most of a minute).

CPU: B 1, emsize 256, nhid 1024, 4 layers, a 2000-token prompt, float32. GPU: the paper's size,
B 1 and B 16, bf16 autocast, a 2000-token prompt.
"""
import contextlib
import time

import pytest
import torch

from published_sharnn import PublishedSHARNN
from conftest import Variant
from sharnn_fast import SHARNN
from sharnn_fast.generation import _compile_step, _Decoder, choose_next

SIZES = {
    "cpu": dict(ntoken=256, ninp=256, nhid=1024, nlayers=4, prompt=2000, batches=[1], dtype="float32"),
    "cuda": dict(ntoken=256, ninp=1024, nhid=4096, nlayers=4, prompt=2000, batches=[1, 16], dtype="bfloat16"),
}


def models(size, device):
    args = ("LSTM", size["ntoken"], size["ninp"], size["nhid"], size["nlayers"], 0.0, 0.0, 0.0)
    torch.manual_seed(0)
    ours = SHARNN(*args).to(device).eval()
    published = PublishedSHARNN(*args).to(device).eval()
    published.load_state_dict(ours.state_dict(), strict=True)
    return ours, published


def autocast(device, size):
    if size["dtype"] == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def decode_bytes(model, memory_positions, B):
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if not n.startswith("encoder."))
    attn_blocks = sum(b.attn is not None for b in model.blocks)
    return weights + attn_blocks * memory_positions * B * model.ninp * 4


@pytest.mark.parametrize("B_index", [0, 1])
def test_generate(bench, device, B_index):
    size, B, P = batch_size(device, B_index)
    ours, published = models(size, device)
    prompt = torch.randint(0, size["ntoken"], (P, B), device=device)
    with torch.no_grad(), autocast(device, size):
        bench.compare(
            f"generate prefill B {B}",
            {"published": lambda: published(prompt), "generate (auto)": lambda: ours(prompt)},
            baseline="published", size=case_size(size, B, P), work=dict(tokens=P * B), budget="model")
        steps = decode_steps(ours, published, prompt, compiled=False)
        bench.compare(f"generate decode per token B {B}", steps, baseline="published loop",
                      size=dict(case_size(size, B, P), memory=P), work=decode_work(ours, P, B))


@pytest.mark.parametrize("B_index", [0, 1])
def test_generate_decode_compiled(bench, device, B_index):
    size, B, P = batch_size(device, B_index)
    if device.type == "cpu" and not bench.timing:
        pytest.skip("compiling the decode step takes most of a minute on a CPU: not under --benchmark-disable")
    ours, published = models(size, device)
    prompt = torch.randint(0, size["ntoken"], (P, B), device=device)
    with torch.no_grad(), autocast(device, size):
        steps = decode_steps(ours, published, prompt, compiled=True)
        bench.compare(f"generate decode per token B {B}, compiled", steps, baseline="published loop",
                      size=dict(case_size(size, B, P), memory=P), work=decode_work(ours, P, B))


def batch_size(device, B_index):
    size = SIZES[device.type]
    if B_index >= len(size["batches"]):
        pytest.skip(f"only B in {size['batches']} on {device.type}")
    return size, size["batches"][B_index], size["prompt"]


def case_size(size, B, P):
    return dict(B=B, prompt=P, d=size["ninp"], F=size["nhid"], layers=size["nlayers"], dtype=size["dtype"])


def decode_work(model, P, B):
    return dict(tokens=B, bytes=decode_bytes(model, P + 1, B), steps=1)


def decode_steps(ours, published, prompt, compiled: bool) -> dict:
    """The per-token variants, each starting every call from the state after ``prompt``: the
    published loop, our eager step and, with ``compiled``, our compiled step (compiled here, before
    any timing: its compile seconds go in the row's notes)."""
    h, hidden, mems, _, _ = published(prompt)
    token = published.decoder(h[-1]).argmax(-1)  # [B]
    start = ours(prompt, return_h=False)[1:]
    decoder = _Decoder(ours, *start)
    start_hidden = list(decoder.hidden)
    rings = [memory for memory in decoder.memories if memory is not None]
    start_rings = [(memory.filled, memory.head) for memory in rings]

    def published_step():
        out, _, _, _, _ = published(token.unsqueeze(0), hidden=hidden, mems=mems)
        return published.decoder(out[-1]).argmax(-1)

    def our_step():
        decoder.hidden = list(start_hidden)
        for memory, (filled, head) in zip(rings, start_rings):
            memory.filled, memory.head = filled, head
        return choose_next(ours.decoder(decoder.step(token)), False, 1.0, None, None, None)

    variants = {"published loop": published_step, "generate": our_step}
    if not compiled:
        return variants
    # The decoder generate(compile=True) builds: static, on a CPU reading the ring's rows in use.
    static = _Decoder(ours, *start, static=True, masked=prompt.device.type != "cpu")
    began = time.perf_counter()
    compiled_step = _compile_step(ours, static, prompt.shape[1], required=True)
    compile_s = time.perf_counter() - began
    # Every call starts from the prompt's state: (h, c) and the ring's counters put back (the row
    # a step writes is the same at every call). One small copy per tensor.
    written = [t for pair in static.hidden for t in pair]
    written += [t for memory in static.memories if memory is not None for t in (memory.head_t, memory.filled_t)]
    saved = [t.clone() for t in written]

    def compiled_call():
        torch._foreach_copy_(written, saved)
        return choose_next(compiled_step(token), False, 1.0, None, None, None)

    variants["generate, compiled"] = Variant(compiled_call, info=dict(compile_s=round(compile_s, 1)))
    return variants


_FIRST_FORWARD = """
import sys, torch
sys.path.insert(0, {tests!r})
if {published}:
    from published_sharnn import PublishedSHARNN as Model
else:
    from sharnn_fast import SHARNN as Model
model = Model("LSTM", 256, 64, 256, 3).eval()
with torch.no_grad():
    model(torch.randint(0, 256, (16, 1)))
"""


def test_first_forward_in_a_fresh_process(bench, device):
    """What a user of generate.py waits for before the first token: a new Python process that
    imports the model, builds a small one and runs one forward (CPU, whatever the machine has)."""
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).resolve().parent.parent / "tests")

    def fresh_process(published):
        script = _FIRST_FORWARD.format(tests=tests, published=published)
        return lambda: subprocess.run([sys.executable, "-c", script], check=True)

    bench.compare("first forward in a fresh process",
                  {"published": fresh_process(True), "sharnn_fast": fresh_process(False)},
                  baseline="published", size=dict(B=1, T=16, d=64, F=256, layers=3, dtype="float32"),
                  budget="model")
