"""SHARNN.generate: the incremental decoder against the full model, sampling rules, state, errors,
and a first call that imports nothing slow."""
import logging
import os
import subprocess
import sys

import pytest
import torch

from sharnn_fast import SHARNN, generation
from sharnn_fast.generation import (CompileError, GenerationState, choose_next, generate, next_token_distribution,
                                    use_compile)
from tolerances import assert_close

V = 23
BACKENDS = ["reference", "torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def trained_looking_model(seed=0, backend=None, **kwargs):
    """Weights moved well away from their initialisation, so the logits are far from ties."""
    torch.manual_seed(seed)
    model = SHARNN("LSTM", V, 16, 32, 3, 0.0, 0.0, 0.0, backend=backend, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


def per_token_argmax(model, tokens, prompt_len):
    """The published generation loop, teacher-forced: the prompt in one call, then every later
    token in a call of its own with hidden and mems carried. The argmax after each position."""
    with torch.no_grad():
        h, hidden, mems, _, _ = model(tokens[:prompt_len])
        preds = [model.decoder(h[-1]).argmax(-1)]
        for t in range(prompt_len, tokens.shape[0] - 1):
            h, hidden, mems, _, _ = model(tokens[t:t + 1], hidden=hidden, mems=mems)
            preds.append(model.decoder(h[-1]).argmax(-1))
    return torch.stack(preds)


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_equals_the_argmax_of_a_teacher_forced_full_sequence_forward(backend, B):
    model = trained_looking_model(1, backend)
    prompt = torch.randint(0, V, (9, B))
    out = model.generate(prompt, 25, do_sample=False)
    assert out.shape == (34, B) and out.dtype == torch.int64
    assert torch.equal(out[:9], prompt)
    with torch.no_grad():  # one pass over everything: under the memory cap, the same model
        logits = model.decoder(model(out)[0])  # [34, B, V]
    assert torch.equal(logits[8:-1].argmax(-1), out[9:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_across_the_memory_cap(backend):
    """A small cap (the model's num_max_positions), crossed many times over: the ring buffer drops
    the oldest positions exactly as the model's memory does."""
    model = trained_looking_model(2, backend)
    model.num_max_positions = 12
    prompt = torch.randint(0, V, (5, 2))
    out = model.generate(prompt, 40, do_sample=False)
    assert torch.equal(per_token_argmax(model, out, 5), out[5:])


def test_greedy_across_the_published_5000_position_cap():
    model = trained_looking_model(3, "torch")
    prompt = torch.randint(0, V, (4990, 1))
    out, state = model.generate(prompt, 20, do_sample=False, return_state=True)
    assert torch.equal(per_token_argmax(model, out, 4990), out[4990:])
    assert [m.shape[0] for m in state.mems if torch.is_tensor(m)] == [5000]


def test_fixed_shape_decoder_equals_the_sliced_one_across_the_cap():
    """The decoder a CUDA graph replays (fixed shapes, counters on the device, masked ring) runs
    on CPU too: it must give the same tokens and state as the one that slices the ring."""
    model = trained_looking_model(11, "torch", attn_layers=[0, 2])
    model.num_max_positions = 10
    prompt = torch.randint(0, V, (4, 2))
    runs = [generate(model, prompt, 30, do_sample=False, return_state=True, static=static)
            for static in (False, True)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(per_token_argmax(model, runs[1][0], 4), runs[1][0][4:])
    for m, m2 in zip(runs[0][1].mems, runs[1][1].mems):
        if torch.is_tensor(m):
            assert_close(m2, m, name="memory of the fixed-shape decoder")


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 3])
def test_cuda_graph_decoder_equals_eager_on_gpu(B, monkeypatch):
    model = trained_looking_model(12, "torch").cuda()
    model.num_max_positions = 16
    prompt = torch.randint(0, V, (5, B), device="cuda")
    out = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("SHARNN_GENERATE_CUDA_GRAPHS", setting)
        out[setting] = model.generate(prompt, 40, do_sample=False)
    assert torch.equal(out["0"], out["1"])
    assert torch.equal(per_token_argmax(model, out["1"], 5), out["1"][5:])


@pytest.mark.gpu
def test_cuda_graph_of_the_compiled_step_equals_eager_on_gpu(monkeypatch):
    """The CUDA graph captures the compiled step (masked ring, counters on the device)."""
    model = trained_looking_model(16, "torch").cuda()
    model.num_max_positions = 16
    prompt = torch.randint(0, V, (5, 3), device="cuda")
    monkeypatch.setenv("SHARNN_GENERATE_CUDA_GRAPHS", "1")
    compiled = model.generate(prompt, 40, do_sample=False, compile=True)
    assert generation.is_step_compiled(model, 3, prompt.device, masked=True)
    assert torch.equal(compiled, model.generate(prompt, 40, do_sample=False, compile=False))
    assert torch.equal(per_token_argmax(model, compiled, 5), compiled[5:])


def test_bad_cuda_graph_setting_is_rejected(monkeypatch):
    monkeypatch.setenv("SHARNN_GENERATE_CUDA_GRAPHS", "yes")
    with pytest.raises(ValueError, match="SHARNN_GENERATE_CUDA_GRAPHS"):
        trained_looking_model(13).generate(torch.zeros(2, 1, dtype=torch.long), 2)


def test_state_matches_forward_and_continues_generation():
    model = trained_looking_model(4, "torch", attn_layers="all")
    prompt = torch.randint(0, V, (6, 2))
    first, state = model.generate(prompt, 8, do_sample=False, return_state=True)
    assert isinstance(state, GenerationState)
    with torch.no_grad():
        _, hidden, mems, _, _ = model(first)
    for (h, c), (h2, c2) in zip(state.hidden, hidden):
        assert_close(h, h2, name="h of the state")
        assert_close(c, c2, name="c of the state")
    for m, m2 in zip(state.mems, mems):
        assert_close(m, m2, name="memory of the state")
    more = torch.randint(0, V, (3, 2))
    continued = model.generate(more, 7, do_sample=False, state=state)
    whole = model.generate(torch.cat([first, more]), 7, do_sample=False)
    assert torch.equal(continued, whole[-10:])


def test_a_fixed_generator_reproduces_the_sample():
    model = trained_looking_model(5)
    prompt = torch.randint(0, V, (4, 2))
    runs = [model.generate(prompt, 30, top_k=10, top_p=0.9, temperature=0.8,
                           generator=torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_generate_restores_training_mode_and_needs_no_gradients():
    model = trained_looking_model(6).train()
    model.generate(torch.randint(0, V, (3, 1)), 2)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_generate_under_autocast(dtype):
    model = trained_looking_model(7)
    with torch.autocast("cpu", dtype=dtype):
        out = model.generate(torch.randint(0, V, (5, 2)), 10, generator=torch.Generator().manual_seed(0))
    assert out.shape == (15, 2) and int(out.min()) >= 0 and int(out.max()) < V


# ---------------------------------------------------------------------------------------------------
# Sampling rules
# ---------------------------------------------------------------------------------------------------
LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def test_distribution_after_top_k_and_top_p_is_the_renormalised_one():
    p = LOGITS.softmax(-1)[0]  # [0.574, 0.211, 0.128, 0.078, 0.029, 0.004] (rounded)
    torch.testing.assert_close(next_token_distribution(LOGITS)[0], p)
    top3 = torch.cat([p[:3], torch.zeros(3)]) / p[:3].sum()
    torch.testing.assert_close(next_token_distribution(LOGITS, top_k=3)[0], top3)
    # top-p 0.8: 0.574 < 0.8 <= 0.574 + 0.211 + ... -> the first three reach it? 0.574 + 0.211 =
    # 0.785 < 0.8, so the third is needed as well.
    torch.testing.assert_close(next_token_distribution(LOGITS, top_p=0.8)[0], top3)
    torch.testing.assert_close(next_token_distribution(LOGITS, top_p=0.5)[0], torch.eye(6)[0])
    hot = (LOGITS / 0.5).softmax(-1)[0]
    torch.testing.assert_close(next_token_distribution(LOGITS, temperature=0.5)[0], hot)


@pytest.mark.parametrize("kwargs", [dict(), dict(top_k=3), dict(top_p=0.9), dict(temperature=2.0, top_k=4, top_p=0.95)])
def test_sampled_frequencies_follow_the_distribution(kwargs):
    n = 40000
    expected = next_token_distribution(LOGITS, **{"temperature": 1.0, **kwargs})[0]
    draws = choose_next(LOGITS.expand(n, -1), True, kwargs.get("temperature", 1.0), kwargs.get("top_k"),
                        kwargs.get("top_p"), torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=6).double() / n
    sigma = (expected.double() * (1 - expected.double()) / n).sqrt()
    assert ((freq - expected.double()).abs() <= 5 * sigma + 1e-12).all(), (freq, expected)
    assert (freq[expected == 0] == 0).all()


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, kwargs, error, match", [
    (torch.zeros(0, 1, dtype=torch.long), {}, ValueError, "non-empty"),
    (torch.tensor([[V]]), {}, ValueError, "outside the vocabulary"),
    (torch.tensor([[-1]]), {}, ValueError, "outside the vocabulary"),
    (torch.zeros(2, 1), {}, TypeError, "integer token ids"),
    (torch.zeros(3, dtype=torch.long), {}, ValueError, r"\[T, B\]"),
    ("hello", {}, TypeError, "tensor of token ids"),
    (torch.zeros(2, 1, dtype=torch.long), dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    (torch.zeros(2, 1, dtype=torch.long), dict(temperature=0.0), ValueError, "temperature"),
    (torch.zeros(2, 1, dtype=torch.long), dict(top_p=0.0), ValueError, "top_p"),
    (torch.zeros(2, 1, dtype=torch.long), dict(top_p=1.5), ValueError, "top_p"),
    (torch.zeros(2, 1, dtype=torch.long), dict(top_k=0), ValueError, "top_k"),
    (torch.zeros(2, 1, dtype=torch.long), dict(generator=3), TypeError, "generator"),
    (torch.zeros(2, 1, dtype=torch.long), dict(compile="on"), TypeError, "compile must be None"),
])
def test_bad_input_raises_clear_errors(prompt, kwargs, error, match):
    model = trained_looking_model(8)
    args = dict(max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        model.generate(prompt, **args)


def test_greedy_ignores_the_sampling_arguments():
    model = trained_looking_model(9)
    model.generate(torch.zeros(2, 1, dtype=torch.long), 2, do_sample=False, temperature=0.0)


def test_a_state_from_another_batch_size_or_model_is_rejected():
    model = trained_looking_model(10)
    _, state = model.generate(torch.zeros(2, 2, dtype=torch.long), 1, return_state=True)
    with pytest.raises(ValueError, match="batch size"):
        model.generate(torch.zeros(2, 3, dtype=torch.long), 1, state=state)
    other = SHARNN("LSTM", V, 16, 32, 2)
    with pytest.raises(ValueError, match="another architecture"):
        other.generate(torch.zeros(2, 2, dtype=torch.long), 1, state=state)
    with pytest.raises(TypeError, match="GenerationState"):
        model.generate(torch.zeros(2, 2, dtype=torch.long), 1, state=(state.hidden, state.mems))


# ---------------------------------------------------------------------------------------------------
# The first call imports nothing slow
# ---------------------------------------------------------------------------------------------------
_FIRST_CALL = """
import sys, torch, sharnn_fast
model = sharnn_fast.SHARNN("LSTM", 256, 32, 64, 3).eval()
with torch.no_grad():
    model(torch.randint(0, 256, (8, 1)))                       # no memory: is_causal
    h, hidden, mems, _, _ = model(torch.randint(0, 256, (8, 1)))
    model(torch.randint(0, 256, (3, 1)), hidden=hidden, mems=mems)  # a memory in front
model.generate(torch.randint(0, 256, (5, 1)), 5)
slow = [m for m in ("torch._dynamo", "triton", "torch._inductor") if m in sys.modules]
print("slow imports:", slow)
"""


def test_first_forward_and_generate_import_nothing_slow():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SHARNN_FAST_BACKEND")}
    done = subprocess.run([sys.executable, "-c", _FIRST_CALL], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "slow imports: []" in done.stdout, done.stdout


@pytest.mark.parametrize("temperature", [1e-38, 1e-39, 1e-45, 1e-300, 5e-324])
def test_a_tiny_temperature_samples_the_most_likely_token(temperature):
    """logits / 1e-38 overflows float32 (it crashed with "probability tensor contains inf/nan"):
    every temperature > 0 works, and the limit is greedy (ties share the probability)."""
    probs = next_token_distribution(LOGITS, temperature=temperature)
    assert torch.equal(probs[0], torch.eye(6)[0])
    tied = torch.tensor([[1.0, 3.0, 3.0, -2.0]])
    assert torch.equal(next_token_distribution(tied, temperature=temperature, top_p=0.99)[0],
                       torch.tensor([0.0, 0.5, 0.5, 0.0]))
    generator = torch.Generator().manual_seed(0)
    draws = choose_next(LOGITS.expand(50, -1), True, temperature, None, None, generator)
    assert torch.equal(draws, LOGITS.argmax(-1).expand(50))


# ---------------------------------------------------------------------------------------------------
# The compiled step. Two compiles in all (the step on a CPU, and the masked ring a CUDA graph
# replays), about 25 s each with an empty Inductor cache on 2 cores: one model for the module.
# ---------------------------------------------------------------------------------------------------
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append((record.levelno, record.getMessage()))


@pytest.fixture
def generation_log():
    handler = _Records()
    level = generation.logger.level
    generation.logger.addHandler(handler)
    generation.logger.setLevel(logging.DEBUG)
    yield handler.messages
    generation.logger.removeHandler(handler)
    generation.logger.setLevel(level)


def graphs_compiled():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def compiled():
    """A model with a small memory cap (16, crossed below) whose step is compiled for B 2 on the
    CPU, the first compile's log, prompt and greedy output."""
    model = trained_looking_model(14, "torch")
    model.num_max_positions = 16
    prompt = torch.randint(0, V, (5, 2))
    handler = _Records()
    generation.logger.addHandler(handler)
    level = generation.logger.level
    generation.logger.setLevel(logging.INFO)
    try:
        out = model.generate(prompt, 40, do_sample=False, compile=True)
    finally:
        generation.logger.removeHandler(handler)
        generation.logger.setLevel(level)
    return model, prompt, out, handler.messages


def test_compiled_greedy_equals_the_published_loop_across_the_cap_and_reports_its_compile(compiled):
    model, prompt, out, log = compiled
    assert generation.is_step_compiled(model, 2, torch.device("cpu"), masked=False)
    assert torch.equal(out, model.generate(prompt, 40, do_sample=False, compile=False))
    assert torch.equal(per_token_argmax(model, out, 5), out[5:])
    assert len(log) == 1 and log[0][0] == logging.INFO, log
    assert log[0][1].startswith("compiled the decode step in ") and "once per model and batch size" in log[0][1]


def test_compiled_step_never_compiles_again_for_the_same_model_and_batch(compiled, generation_log):
    """Token after token, call after call (another prompt length, new weights, a state carried on,
    compile=None now that it is compiled): one graph, compiled once."""
    model, prompt, out, _ = compiled
    before = graphs_compiled()
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = model.generate(prompt, 40, do_sample=False)  # compile=None: compiled already, so used
        longer = model.generate(torch.randint(0, V, (11, 2)), 30, do_sample=False, compile=True)
        assert torch.equal(per_token_argmax(model, longer, 11), longer[11:])
        weights = {name: p.clone() for name, p in model.named_parameters()}
        try:
            with torch.no_grad():  # weights are inputs of the graph: new values, no new compile
                model.blocks[1].rnn.weight_hh_l0.mul_(0.5)
                model.blocks[2].ff.linear1.bias.add_(0.3)
            changed = model.generate(prompt, 40, do_sample=False, compile=True)
            assert torch.equal(changed, model.generate(prompt, 40, do_sample=False, compile=False))
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(weights[name])
    assert graphs_compiled() == before and generation_log == []
    assert torch.equal(again, out)
    assert not torch.equal(changed, out)


def test_compiled_state_matches_forward_and_continues_generation(compiled):
    model = compiled[0]
    prompt = torch.randint(0, V, (4, 2))
    first, state = model.generate(prompt, 8, do_sample=False, return_state=True, compile=True)
    eager_first, eager_state = model.generate(prompt, 8, do_sample=False, return_state=True, compile=False)
    assert torch.equal(first, eager_first)
    for (h, c), (h2, c2) in zip(state.hidden, eager_state.hidden):
        assert_close(h, h2, name="h of the compiled state")
        assert_close(c, c2, name="c of the compiled state")
    assert [torch.is_tensor(m) for m in state.mems] == [False, True, False]
    for m, m2 in zip(state.mems, eager_state.mems):
        if torch.is_tensor(m):
            assert_close(m, m2, name="memory of the compiled state")
    more = torch.randint(0, V, (3, 2))
    continued = model.generate(more, 20, do_sample=False, state=state, compile=True)
    assert torch.equal(per_token_argmax(model, torch.cat([first, continued]), 15), continued[3:])


def test_compiled_sampling_draws_what_the_eager_step_draws(compiled):
    model = compiled[0]
    prompt = torch.randint(0, V, (4, 2))
    runs = [model.generate(prompt, 30, top_k=10, top_p=0.9, temperature=0.8, compile=setting,
                           generator=torch.Generator().manual_seed(7)) for setting in (True, False)]
    assert torch.equal(runs[0], runs[1])


def test_compiled_masked_ring_as_the_cuda_graph_replays_it(compiled):
    """On CUDA the compiled step attends over the whole ring with a mask (no .item(): a CUDA graph
    captures it). The same compiled step runs here on the CPU: same tokens, across the cap."""
    model, prompt, out, _ = compiled
    masked = generate(model, prompt, 40, do_sample=False, static=True, compile=True)
    assert generation.is_step_compiled(model, 2, torch.device("cpu"), masked=True)
    assert torch.equal(masked, model.generate(prompt, 40, do_sample=False, compile=False))
    assert torch.equal(per_token_argmax(model, masked, 5), masked[5:])


def test_a_compile_that_fails_falls_back_with_one_warning_or_raises_when_asked(monkeypatch, generation_log):
    """No C++ compiler for Inductor, say: compile=None decodes without compiling (the state the
    failed compile wrote is put back) and warns once; compile=True raises."""
    def no_compiler():
        def step(model, decoder, token):
            for t in decoder.tensors():
                t.fill_(float("nan") if t.is_floating_point() else 3)
            raise RuntimeError("no C++ compiler found")
        return step

    monkeypatch.setattr(generation, "_new_compiled_step", no_compiler)
    monkeypatch.setattr(generation, "COMPILE_MIN_TOKENS", 10)
    model = trained_looking_model(15, "torch")
    model.num_max_positions = 12
    prompt = torch.randint(0, V, (5, 2))
    eager = model.generate(prompt, 30, do_sample=False, compile=False)
    assert generation_log == []
    for _ in range(2):
        assert torch.equal(model.generate(prompt, 30, do_sample=False), eager)
    assert len(generation_log) == 1 and generation_log[0][0] == logging.WARNING, generation_log
    assert "could not compile the decode step" in generation_log[0][1] and "no C++ compiler" in generation_log[0][1]
    with pytest.raises(CompileError, match="no C\\+\\+ compiler.*compile=False"):
        model.generate(prompt, 30, do_sample=False, compile=True)


def test_compile_none_compiles_only_long_generations_on_a_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    n = generation.COMPILE_MIN_TOKENS
    assert not use_compile(None, cpu, 19, False)  # a short generate never pays for a compile
    assert not use_compile(None, cpu, n - 1, False)
    assert use_compile(None, cpu, n, False)
    assert use_compile(None, cpu, 19, True)  # compiled already: free
    assert not use_compile(None, cuda, n, False) and not use_compile(None, cuda, 19, True)
    assert use_compile(True, cuda, 19, False) and use_compile(True, cpu, 1, False)
    assert not use_compile(False, cpu, n, True)
    assert not use_compile(True, cpu, 0, False)  # no step to take
