"""torch.compile: every op and the model trace with symbolic sizes, without graph breaks, and
`sharnn train --compile` compiles a bounded number of graphs over random lengths and a growing
memory (training/compiling.py). Counts, not times: speed is benchmarks/bench_model.py's business."""
import logging

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from op_cases import OP_CASES
from sharnn_fast.backend import preload
from sharnn_fast.ops.lstm import torch_native
from sharnn_fast.training.compiling import CompiledStep, RecompileLimitNotice, graphs_compiled
from sharnn_fast.training.config import build_model, preset_config
from sharnn_fast.training.evaluation import detached
from sharnn_fast.training.loop import NextByteLoss, draw_sequence_length
from tolerances import assert_all_close, outputs_and_grads

# Two shapes per op that differ in every length and in the batch (T, Tk and B), widths alike.
SHAPE_PAIRS = {
    "lstm": [(5, 3, 6, 4), (9, 2, 6, 4)],  # T, B, I, H
    "attention": [(4, 7, 3, 8, 6), (6, 11, 2, 8, 6)],  # Tq, Tk, B, d, dv (a memory in front)
    "boom": [((4, 3), 8, 24), ((7, 2), 8, 24)],  # lead, d, F
}


GPU = pytest.mark.gpu
# (op, backend, device). Not here: the "reference" LSTM, a Python loop over T (the ground truth,
# differentiable to any order), which torch.compile unrolls, so each length is a graph of its own.
# Triton's attention and Boom kernels trace only on a GPU (their triton_op wrappers read the
# launch's real tensors; the CPU interpreter has none under tracing).
CASES = [
    ("lstm", "torch", "cpu"), pytest.param("lstm", "torch", "cuda", marks=GPU),
    ("lstm", "triton", "cuda" if torch.cuda.is_available() else "cpu"),
    pytest.param("lstm", "cuda", "cuda", marks=GPU),
    ("attention", "reference", "cpu"), ("attention", "torch", "cpu"),
    pytest.param("attention", "torch", "cuda", marks=GPU), pytest.param("attention", "triton", "cuda", marks=GPU),
    ("boom", "reference", "cpu"), ("boom", "torch", "cpu"),
    pytest.param("boom", "torch", "cuda", marks=GPU), pytest.param("boom", "triton", "cuda", marks=GPU),
]


@pytest.mark.parametrize("op, backend, device", CASES)
def test_every_op_compiles_once_for_all_lengths(op, backend, device):
    """fullgraph=True (a graph break raises), dynamic=True, through AOT autograd (aot_eager: the
    fake implementations and autograd registrations, without Inductor's C++ compile): no new graph
    for the second shape, and the eager values and gradients for both."""
    case = OP_CASES[op]
    preload(backend)  # as SHARNN(backend=...) and set_backend do: no import while tracing
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(case.run(backend), fullgraph=True, dynamic=True, backend=counter)
    graphs = []
    for shape in SHAPE_PAIRS[op]:
        inputs = case.make_inputs(*shape, device=device)
        assert_all_close(outputs_and_grads(compiled, inputs), outputs_and_grads(case.run(backend), inputs),
                         torch.float32, what=f"compiled {backend} {op} {shape}")
        graphs.append(counter.frame_count)
    # (A first compile may restart once, e.g. to treat a float argument as a constant: both count.)
    assert graphs[1] == graphs[0], f"{backend} {op}: the second shape compiled again"


def test_the_model_compiles_once_for_all_lengths_and_memories():
    """The model under fullgraph=True with symbolic T and M: one graph for every length and
    memory once a memory exists, with the eager loss."""
    torch.manual_seed(0)
    model = build_model(dict(preset_config("tiny").to_dict(), emsize=16, nhid=32, memory=40)).eval()
    loss_fn = NextByteLoss(model)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    hidden = mems = None
    for T in (9, 7, 12, 9, 15, 6):
        x = torch.randint(0, 256, (T + 1, 2))
        if mems:
            for m in mems:
                if torch.is_tensor(m):
                    torch._dynamo.mark_dynamic(m, 0)
        torch._dynamo.mark_dynamic(x, 0)
        got = compiled(x[:-1], x[1:], hidden, mems)
        expected = loss_fn(x[:-1], x[1:], hidden, mems)
        torch.testing.assert_close(got[0], expected[0])
        _, hidden, mems = got
        hidden, mems = detached(hidden, mems)
    # The first step has no memory; every later one is the same graph (memory from 9 to 40 rows).
    assert counter.frame_count == 2


def test_training_compiles_at_most_three_graphs_in_300_steps():
    """The issue's count: 300 steps of the tiny preset under Inductor (the compiler that adds its
    own guards on sizes), the paper's random lengths, the memory growing from nothing to its cap
    and staying there. No graph break, at most three graphs."""
    config = preset_config("tiny")
    torch.manual_seed(0)
    model = build_model(config)
    step = CompiledStep(NextByteLoss(model), model.num_max_positions)
    torch._dynamo.reset()
    counters.clear()
    lengths = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    hidden = mems = None
    seen = set()
    recomputed = torch_native.WORKSPACES.recomputed
    for _ in range(300):
        T = draw_sequence_length(config.bptt, lengths)
        seen.add(T)
        x = torch.randint(0, 256, (T + 1, config.batch_size))
        loss, hidden, mems = step(x[:-1], x[1:], hidden, mems)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hidden, mems = detached(hidden, mems)
    assert len(seen) > 10 and mems[config.nlayers - 2].shape[0] == config.memory
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert step.graphs == graphs_compiled() <= 3, step.graphs
    # Every backward found its forward's oneDNN workspace (none ran the LSTM forward again).
    assert torch_native.WORKSPACES.recomputed == recomputed


def test_a_recompile_limit_becomes_one_line_with_the_reason(caplog):
    """Dynamo's multi-line warning is replaced by one line naming the limit and the last reason."""
    lines = []
    notice = RecompileLimitNotice(lines.append).install()
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level(logging.WARNING):
            compiled = torch.compile(lambda t: t * 2, backend="eager", dynamic=False)
            for n in (2, 3, 4):
                assert compiled(torch.ones(n)).tolist() == [2.0] * n  # the run goes on, uncompiled
    finally:
        notice.remove()
    assert notice.hits >= 1 and len(lines) == notice.hits
    assert "\n" not in lines[0] and "recompile_limit (1)" in lines[0] and "size mismatch" in lines[0]
    assert "TORCH_LOGS=recompiles" in lines[0]
    assert not any("hit config.recompile_limit" in r.getMessage() for r in caplog.records)
