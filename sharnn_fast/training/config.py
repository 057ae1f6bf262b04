"""Training configuration: the hyperparameters, the presets, and the model they describe."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .errors import UserInputError

NTOKEN = 256  # bytes
# The fields that fix the model's parameters: a checkpoint must match them to be loaded.
ARCHITECTURE_KEYS = ("ntoken", "emsize", "nhid", "nlayers", "attn_layers")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything a run needs. Field names follow the published main.py's flags where they exist
    (--emsize --nhid --nlayers --bptt --batch_size --lr --warmup --clip --dropout --dropouth
    --dropouti --optimizer --wdecay --log-interval --when --seed). Units: steps are optimizer steps;
    batch_size is per process (the global batch is batch_size x ranks); bptt in bytes."""
    # model
    emsize: int = 128
    nhid: int = 512
    nlayers: int = 2
    attn_layers: Union[None, str, tuple] = None  # None: the second-to-last block; "all"; or indices
    dropout: float = 0.1
    dropouth: float = 0.1
    dropouti: float = 0.1
    memory: int = 5000  # attention memory in positions (the model's num_max_positions; 5000 published)
    ntoken: int = NTOKEN
    # data
    data: Optional[str] = None  # a prepared folder or a file; None: the embedded default corpus
    split: Optional[tuple] = None  # train/valid/test fractions for a plain file; None: 90/5/5 (enwik8: the paper's)
    # optimisation
    optimizer: str = "lamb"
    lr: float = 2e-3
    wdecay: float = 1.2e-6
    warmup: int = 800
    schedule: str = "constant"
    when: tuple = ()
    clip: float = 0.25
    bptt: int = 1024
    batch_size: int = 16
    accumulate: int = 1  # micro-batches per step: each takes batch_size / accumulate columns
    max_steps: Optional[int] = None
    epochs: Optional[int] = None
    seed: int = 5512
    # evaluation and logging
    eval_batch_size: int = 10  # the published eval_batch_size
    eval_interval: int = 1000
    log_interval: int = 10
    # execution
    device: Optional[str] = None  # None: cuda if available, else cpu
    precision: Optional[str] = None  # None: default_precision(device), fp16 on a GPU, fp32 on a CPU
    backend: Optional[str] = None
    compile: bool = False
    autotune: Optional[bool] = None  # tune "auto" at the first step; None: on where a GPU trains, off on a CPU
    preset: str = "custom"
    extra: dict = field(default_factory=dict)  # room for later fields without a format change

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def architecture(self) -> dict:
        return {key: getattr(self, key) for key in ARCHITECTURE_KEYS}


_PAPER = dict(emsize=1024, nhid=4096, nlayers=4, attn_layers=None, bptt=1024, batch_size=16,
              optimizer="lamb", lr=2e-3, wdecay=1.2e-6, warmup=800, clip=0.25, dropout=0.1,
              dropouth=0.1, dropouti=0.1, memory=5000, seed=5512, epochs=32, max_steps=None,
              log_interval=10, eval_interval=1000)
PRESETS = {
    # The recipe scaled down to about a minute on 2 CPU cores (45 s on one thread, valid bpc 8 -> 2.7). The memory keeps the paper's ratio
    # to bptt (5000 / 1024, about 5 segments); 5000 positions would make attention most of the cost.
    "tiny": dict(_PAPER, emsize=128, nhid=512, nlayers=2, bptt=64, batch_size=16, warmup=50, memory=320,
                 epochs=None, max_steps=500, log_interval=10, eval_interval=100),
    # The published enwik8 command (Merity 2019): 1.076 bpc on test, single head. This is stage 1 of
    # the recipe; stage 2 resumes its best.pt with --lr 1e-3 --seed 125 --epochs 37 (README, enwik8).
    "paper": dict(_PAPER),
    # The same with attention in every block: the paper's 1.068 bpc model.
    "paper-all-attn": dict(_PAPER, attn_layers="all"),
}


def default_precision(device: torch.device) -> str:
    """The precision when none is given: fp16 autocast with dynamic loss scaling on a CUDA GPU, fp32
    on a CPU. fp16 is the published recipe's (apex O1), and on a GPU the fastest: cuDNN's persistent
    LSTM, which "auto" uses there, runs fp16 only (on an H200 at the paper's size, 8.8 ms a layer
    forward+backward against 14.1 for the best bf16 LSTM; README, Backends)."""
    return "fp16" if torch.device(device).type == "cuda" else "fp32"


def autocast_context(device, precision: str):
    """The context a model runs under at a ``--precision``: "fp32" none (a null context), "bf16"
    and "fp16" ``torch.autocast`` to that dtype on ``device``'s type (a torch.device or its name).
    Raises UserInputError (a ValueError) for another precision."""
    if precision not in PRECISIONS:
        raise UserInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def default_preset() -> str:
    """"tiny" on a CPU, "paper" where a CUDA GPU is present."""
    return "paper" if torch.cuda.is_available() else "tiny"


def preset_config(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise UserInputError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return TrainConfig(**PRESETS[name], preset=name)


def parse_attn_layers(text: Optional[str]):
    """'all' -> "all"; '0,2' -> (0, 2); None stays None (the published second-to-last block)."""
    if text is None or text == "all":
        return text
    try:
        return tuple(int(i) for i in text.split(",") if i.strip())
    except ValueError:
        raise UserInputError(f"--attn-layers must be 'all' or block indices such as 0,2; got {text!r}") from None


def validate(config: TrainConfig) -> None:
    """Raise UserInputError naming the first field that cannot work."""
    positive = ("emsize", "nhid", "nlayers", "bptt", "memory", "batch_size", "accumulate", "eval_batch_size",
                "eval_interval", "log_interval")
    for name in positive:
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise UserInputError(f"--{name} must be a positive integer, got {value!r}")
    for name in ("max_steps", "epochs"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 0):
            raise UserInputError(f"--{name.replace('_', '-')} must be a non-negative integer, got {value!r}")
    if config.max_steps is None and config.epochs is None:
        raise UserInputError("give --max-steps or --epochs: the run needs an end")
    for name in ("dropout", "dropouth", "dropouti"):
        if not 0.0 <= getattr(config, name) < 1.0:
            raise UserInputError(f"--{name} must be in [0, 1), got {getattr(config, name)}")
    for name in ("lr", "wdecay", "clip"):
        if not 0.0 <= getattr(config, name) < math.inf:
            raise UserInputError(f"--{name} must be a finite number >= 0, got {getattr(config, name)}")
    if not all(isinstance(e, int) and e >= 1 for e in config.when):
        raise UserInputError(f"--when takes epochs counted from 1 (the lr is divided by 10 after each), got "
                             f"{' '.join(map(str, config.when))}")
    if config.warmup < 0:
        raise UserInputError(f"--warmup must be >= 0, got {config.warmup}")
    if config.nhid % config.emsize:
        raise UserInputError(f"--nhid must be a multiple of --emsize (Boom sums nhid / emsize chunks), "
                             f"got nhid {config.nhid}, emsize {config.emsize}")
    if config.batch_size % config.accumulate:
        raise UserInputError(f"--batch_size ({config.batch_size}) must be a multiple of --accumulate "
                             f"({config.accumulate}): each micro-batch takes batch_size / accumulate columns")
    if config.precision is not None and config.precision not in PRECISIONS:
        raise UserInputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}")
    if config.schedule == "cosine" and config.max_steps is None:
        raise UserInputError("--schedule cosine needs --max-steps (the step where the lr reaches 0)")


def build_model(config: TrainConfig | dict):
    """The SHARNN the config describes (ntoken bytes, tie_weights off as in the published enwik8
    run, ``num_max_positions`` = the config's memory), on the CPU, with the current random state
    for initialisation."""
    from ..model import SHARNN

    c = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    attn = list(c.attn_layers) if isinstance(c.attn_layers, tuple) else c.attn_layers
    try:
        model = SHARNN("LSTM", c.ntoken, c.emsize, c.nhid, c.nlayers, dropout=c.dropout, dropouth=c.dropouth,
                       dropouti=c.dropouti, attn_layers=attn, backend=c.backend)
    except (ValueError, TypeError) as err:
        raise UserInputError(f"cannot build the model: {err}") from None
    model.num_max_positions = c.memory  # read by every forward: the memory kept and attended to
    return model
