"""What the training loop of ``sharnn train`` adds to the bare model step, at the tiny preset.

"bare model step" (the baseline): what any hand-written loop does at least, on batches already
cut and on the device: forward with the carried hidden state and memory, decoder, cross-entropy,
backward, clip 0.25, LAMB, detach the state. "sharnn train loop": one turn of Trainer.advance()
on the same segments (the same random lengths from the same seed, the same columns of the same
corpus): drawing the length, reading the batch from the corpus file, the lr schedule,
the same step, the loss kept for the next log flush, the progress counter, a flush (one
synchronisation, the NaN check, the log line) every log interval. Target: at most 3% slower.

On a busy machine the two medians scatter by more than 3%, so a third variant measures the loop's
own work directly: "loop, model stubbed out" is the same Trainer.advance() with the model's
forward replaced by a constant loss (no hidden state, no gradients), i.e. everything the loop does
around the model step, plus the optimizer's and clip's walk over parameters without gradients.
Its time over the bare step's is an upper bound on the loop's overhead (1 / its "vs baseline").

Both start with an empty memory and are called equally often (interleaved rounds), so the
attention memory grows alike in both; when timing, both are first run until the memory is full,
so that every timed step does the same work.
"""
import math

import torch
import torch.nn.functional as F

from sharnn_fast.training import distributed
from sharnn_fast.training.config import build_model, preset_config
from sharnn_fast.training.loop import Trainer, draw_sequence_length
from sharnn_fast.training.optim import build_optimizer

PRESET = "tiny"


class BareModelStep:
    """The baseline: the model step alone, on premade [T, B] batches (CPU or GPU)."""

    def __init__(self, config, batches, device):
        torch.manual_seed(config.seed)
        self.model = build_model(config).to(device).train()
        self.optimizer = build_optimizer(config.optimizer, self.model.parameters(), lr=config.lr,
                                         weight_decay=config.wdecay)
        self.batches, self.calls = batches, 0
        self.hidden = self.mems = None
        self.clip = config.clip

    def __call__(self):
        x, y = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        self.optimizer.zero_grad(set_to_none=True)
        h, hidden, mems, _, _ = self.model(x, hidden=self.hidden, mems=self.mems)
        logits = self.model.decoder(h)
        F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.hidden = [(a.detach(), b.detach()) for a, b in hidden]
        self.mems = [m.detach() if torch.is_tensor(m) else [] for m in mems]


class StubbedModelForward:
    """Stands in for the model + loss in Trainer.forward: a constant loss, no state, no gradients."""

    def __call__(self, x, y, hidden, mems):
        return torch.zeros((), requires_grad=True) + 1.0, [], []


def premade_batches(trainer, count, device):
    """The segments the trainer will train on, cut in advance: same lengths, same positions."""
    lengths = torch.Generator()
    lengths.set_state(trainer.lengths.get_state())
    batches, position = [], 0
    for _ in range(count):
        x, y = trainer.train_stream.segment(position, draw_sequence_length(trainer.config.bptt, lengths), device)
        batches.append((x, y))
        position = position + x.shape[0] if position + x.shape[0] < trainer.train_stream.length - 1 else 0
    return batches


def test_train_loop_overhead(bench, device):
    config = preset_config(PRESET)
    config.eval_interval = 10**9  # evaluation is not part of a step
    config.max_steps = None
    config.epochs = 10**6
    config.device = str(device)
    config.precision = "fp32"  # as the baseline
    ctx = distributed.Context(rank=0, world_size=1, local_rank=0, device=device)
    trainer = Trainer(config, ctx, save_dir=None, progress=False)  # the embedded corpus
    memory_full = math.ceil(config.memory / config.bptt) + 5  # steps until the attention memory is at its cap
    bare = BareModelStep(config, premade_batches(trainer, 1000, device), device)

    def loop():
        trainer.advance()

    stubbed = Trainer(config, ctx, save_dir=None, progress=False)
    stubbed.forward = StubbedModelForward()
    if bench.timing:
        for _ in range(memory_full):
            loop()
            bare()
    bench.compare(f"train loop overhead ({PRESET} preset)", {"bare model step": bare, "sharnn train loop": loop,
                                                             "loop, model stubbed out": stubbed.advance},
                  baseline="bare model step",
                  size=dict(emsize=config.emsize, nhid=config.nhid, nlayers=config.nlayers, bptt=config.bptt,
                            B=config.batch_size, dtype="float32", memory=config.memory),
                  work=dict(tokens=config.bptt * config.batch_size), budget="model")
