"""Training, evaluation and data preparation: what ``sharnn train``, ``sharnn eval`` and
``sharnn prepare`` run (the SHA-RNN paper's enwik8 recipe).

- :mod:`.data`: prepare splits, the embedded default corpus, batches read from disk.
- :mod:`.optim`: LAMB (the published "minimum trust" form), AdamW, SGD, the learning-rate schedule.
- :mod:`.loop`: the training loop, and the bodies of ``sharnn train`` and ``sharnn eval``.
- :mod:`.evaluation`: bits per byte of a split, state carried across it (the one scoring loop).
- :mod:`.dynamic`: dynamic evaluation (Krause et al. 2018), the weights adapting to scored text.
- :mod:`.checkpoint`: the checkpoint format, atomic saves, ``load_checkpoint``.
- :mod:`.distributed`: torchrun / DDP glue.
"""
from .checkpoint import load_checkpoint, read_checkpoint
from .config import PRESETS, TrainConfig
from .data import load_corpus, prepare
from .errors import UserInputError
from .dynamic import DynamicEval, evaluate_dynamic
from .evaluation import evaluate
from .loop import TrainingDiverged, evaluate_checkpoint, train
from .optim import Lamb

__all__ = ["train", "evaluate", "evaluate_checkpoint", "evaluate_dynamic", "DynamicEval", "prepare", "load_corpus",
           "load_checkpoint", "read_checkpoint", "Lamb", "TrainConfig", "PRESETS", "UserInputError",
           "TrainingDiverged"]
