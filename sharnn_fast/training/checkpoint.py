"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)`` (no pickled code).

Format (version 1): one ``torch.save`` of a dict holding only tensors and plain Python values
(dict, list, tuple, str, int, float, bool, None), so it loads with ``weights_only=True``:

- ``format``: ``"sharnn_fast.checkpoint"``; ``version``: 1.
- ``config``: :class:`~sharnn_fast.training.config.TrainConfig` as a dict. Its architecture keys
  (``ntoken`` = 256 bytes, ``emsize``, ``nhid``, ``nlayers``, ``attn_layers``: None for the
  published second-to-last block, ``"all"``, or a tuple of block indices) and dropouts rebuild the
  model: ``SHARNN("LSTM", ntoken, emsize, nhid, nlayers, dropout, dropouth, dropouti,
  attn_layers=...)``, then ``model.num_max_positions = memory`` (the attention memory, 5000 as
  published; smaller in the tiny preset).
- ``model``: the SHARNN ``state_dict`` (the published model's parameter names and shapes; the
  parameters' dtype, float32 unless trained otherwise).
- ``optimizer``: the optimizer's ``state_dict`` (LAMB: ``exp_avg``, ``exp_avg_sq`` per parameter;
  its groups hold ``max_weight_norm``, the clamp on the weight norm in the trust ratio, 10).
- ``scaler``: the fp16 GradScaler's ``state_dict``, or None.
- ``progress``: ``step`` (optimizer steps done), ``epoch`` (finished epochs), ``position`` (byte
  offset in each training column where the next segment starts), ``tokens`` (tokens trained on,
  all ranks), ``elapsed_s``, ``best_valid_bpc`` and ``best_step`` (None before the first evaluation),
  ``last_valid`` (``{"step", "loss", "bpc"}`` of the last valid evaluation, or None: a checkpoint
  saved by a stop on an evaluation step shows it was not evaluated, and the resume evaluates it),
  ``lr`` (the last step's learning rate), ``world_size`` and ``global_batch``. ``last_valid`` and
  ``lr`` are missing in checkpoints of sharnn_fast 0.1.
- ``rng``: ``torch_cpu`` [world_size, n] uint8 (each rank's CPU generator: dropout), ``cuda``
  [world_size, n] uint8 or None, ``lengths`` uint8 (the generator of the random sequence lengths,
  the same on every rank). Python's ``random`` and numpy are not used by training.
- ``carry``: the hidden state and attention memories carried into the next segment, for the global
  batch (all ranks, columns in order): ``hidden`` a list of (h, c) per block, each [1, G, emsize];
  ``mems`` a list per block of [M, G, emsize] tensors (None for blocks without attention); or None
  at the start of an epoch.

- ``checksum``: ``{"sha256": hex}`` of the checkpoint's content (:func:`content_digest`: every
  tensor's dtype, shape and bytes and every plain value, in order), checked when it is read, so a
  file whose bytes changed after it was written is refused. Missing in checkpoints of sharnn_fast
  0.1 (then nothing is checked).
- ``data``: what the run trained on, ``{split: {"bytes": n, "sha256": hex}}`` for train, valid and
  test (hashed once when the run starts); ``--resume`` refuses data whose size or hash differs.
  Missing in checkpoints of sharnn_fast 0.1 (then nothing is compared).

``best.pt`` has the same layout. No checkpoint holds a NaN or inf weight: training stops instead of
saving one (naming the last good checkpoint), and reading one is an error; ``best_valid_bpc`` is
always a finite number or None.

Changes within version 1:

- LAMB's trust ratio clamps the weight norm at 10, as the published "minimum trust" LAMB does
  (sharnn_fast 0.1 did not). A checkpoint whose LAMB groups have no ``max_weight_norm`` was written
  without the clamp; it still loads and resumes, but continues under the clamp (``sharnn train``
  prints a note), so a resumed run no longer matches what the old version would have done. :func:`load_checkpoint` rebuilds the model for inference.
"""
from __future__ import annotations

import hashlib
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from .._files import atomic_open
from .config import ARCHITECTURE_KEYS, TrainConfig, build_model
from .errors import UserInputError

FORMAT = "sharnn_fast.checkpoint"
VERSION = 1


def save_checkpoint(path, payload: dict) -> None:
    """Write ``payload`` (the layout above, less ``format``, ``version`` and ``checksum``)
    atomically to path."""
    payload = dict(format=FORMAT, version=VERSION, **{k: v for k, v in payload.items() if k != "checksum"})
    payload["checksum"] = {"sha256": content_digest(payload)}
    with atomic_open(path) as out:
        torch.save(payload, out)


def content_digest(payload: dict) -> str:
    """sha256 (hex) of a checkpoint's content, ``checksum`` left out: each tensor's dtype, shape and
    bytes, each plain value's type and repr, dicts in insertion order (which torch.save keeps). It
    reads every byte once: 0.6 s for 640 MiB of tensors (about the paper model with its LAMB state) on
    2 CPU cores, measured here."""
    digest = hashlib.sha256()

    def visit(value):
        if torch.is_tensor(value):
            t = value.detach().to("cpu").contiguous()
            digest.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(f"dict {len(value)};".encode())
            for key, item in value.items():
                visit(key)
                visit(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__} {len(value)};".encode())
            for item in value:
                visit(item)
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())

    visit({key: value for key, value in payload.items() if key != "checksum"})
    return digest.hexdigest()


def read_checkpoint(path, map_location="cpu") -> dict:
    """The checkpoint dict at ``path`` (see the module docstring), loaded with weights_only=True.

    Raises UserInputError: missing file; a truncated or corrupt file; a file that holds pickled
    objects other than tensors and plain values, or that is not a sharnn_fast checkpoint (e.g. a
    bare state_dict or a published whole-model pickle); a newer format version.
    """
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"checkpoint {path} is a folder; pass one of its checkpoints, e.g. "
                             f"{path / 'best.pt'} or {path / 'last.pt'}")
    if not path.is_file():
        raise UserInputError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the error below says it
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise UserInputError(f"{path} is not a sharnn_fast checkpoint: torch.load(weights_only=True) "
                             "refused it (it is not a file torch.save wrote, or it holds Python objects "
                             "other than tensors and plain values, which are never loaded)") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise UserInputError(f"{path} is truncated or corrupt ({_first_sentence(err)})") from None
    except Exception as err:  # noqa: BLE001: whatever else torch.load trips on in a foreign file
        raise UserInputError(f"{path} is not a sharnn_fast checkpoint ({type(err).__name__}: "
                             f"{_first_sentence(err)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        hint = " (it looks like a bare state_dict)" if isinstance(payload, dict) and payload and all(
            torch.is_tensor(v) for v in payload.values()) else ""
        raise UserInputError(f"{path} is not a sharnn_fast checkpoint{hint}")
    if payload.get("version") != VERSION:
        raise UserInputError(f"{path} has checkpoint format version {payload.get('version')!r}; this "
                             f"sharnn_fast reads version {VERSION}: upgrade the package")
    missing = [k for k in ("config", "model", "optimizer", "progress", "rng") if k not in payload]
    if missing:
        raise UserInputError(f"{path} is an incomplete checkpoint: no {', '.join(missing)}")
    wrong = [k for k in ("config", "model", "optimizer", "progress", "rng") if not isinstance(payload[k], dict)]
    if wrong or not isinstance(payload["progress"].get("step"), int):
        what = f"its {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not a dict" if wrong else \
            "its progress has no step count"
        raise UserInputError(f"{path} is a malformed checkpoint: {what}")
    saved = payload.get("checksum")
    if saved is not None and (not isinstance(saved, dict) or saved.get("sha256") != content_digest(payload)):
        raise UserInputError(f"{path} is corrupt: its content does not match the checksum saved with it "
                             "(its bytes changed after it was written); use another checkpoint")
    bad = non_finite_tensors(payload["model"])
    if bad:
        raise UserInputError(f"{path} holds NaN or inf weights ({describe_tensors(bad)}): it was saved by a run "
                             f"that had diverged; use an earlier checkpoint")
    return payload


def non_finite_tensors(state: dict) -> dict:
    """{name: number of NaN or inf elements} for the floating-point tensors of ``state`` that hold
    any (one synchronisation when all are finite)."""
    floats = {k: v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}
    if not floats or torch.stack([torch.isfinite(v).all() for v in floats.values()]).all():
        return {}
    counts = {k: int((~torch.isfinite(v)).sum()) for k, v in floats.items()}
    return {k: n for k, n in counts.items() if n}


def describe_tensors(counts: dict) -> str:
    """'41,600 non-finite values in 3 tensors, first encoder.weight'."""
    first = next(iter(counts))
    return (f"{sum(counts.values()):,} non-finite values in {len(counts)} tensor"
            f"{'s' if len(counts) > 1 else ''}, first {first}")


def _first_sentence(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text.split(". ")[0] if text else type(err).__name__


def check_architecture(checkpoint_config: dict, config: TrainConfig, path) -> None:
    """Raise UserInputError naming the first architecture field where the flags and the checkpoint differ."""
    for key in ARCHITECTURE_KEYS:
        theirs, ours = checkpoint_config.get(key), getattr(config, key)
        if theirs != ours:
            raise UserInputError(f"checkpoint {path} has {key}={theirs!r} but the flags ask for "
                                 f"{key}={ours!r}: drop the flag or start a new run")


def load_weights(model, state: dict, path) -> None:
    """``model.load_state_dict(state)`` (strict), or UserInputError naming the checkpoint and the
    first weight that is missing, unexpected or of another shape than the model's."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines[1:]), lines[0] if lines else type(err).__name__)
        raise UserInputError(f"{path}: its weights do not fit the model its config describes "
                             f"({detail.rstrip('.')})") from None


def load_checkpoint(path, map_location="cpu", backend=None):
    """Load a checkpoint written by ``sharnn train`` for inference: ``(model, config)``.

    model: the :class:`~sharnn_fast.SHARNN` with the checkpoint's weights, in eval mode, on
    ``map_location`` (default the CPU). config: the run's configuration as a plain dict
    (architecture, data, hyperparameters; see :mod:`sharnn_fast.training.checkpoint`).
    backend: see :func:`model_from_checkpoint` (default: the saved one where it runs, else auto).
    Loads with ``torch.load(weights_only=True)``: no pickled code is ever run.
    Raises UserInputError (a ValueError) for a missing, truncated or foreign file.
    """
    payload = read_checkpoint(path, map_location="cpu")
    return model_from_checkpoint(payload, path, torch.device(map_location), backend), \
        TrainConfig.from_dict(payload["config"]).to_dict()


def model_from_checkpoint(payload: dict, path, device: torch.device, backend=None):
    """The checkpoint's model with its weights, in eval mode, on ``device``.

    A checkpoint's backend is the training run's preference, not part of the model. Which backend
    the model gets, first match wins: ``backend`` when given (an explicit choice: if it cannot
    run, the first forward says why); None, following the process-wide choice, when one was made
    (:func:`sharnn_fast.set_backend` or ``SHARNN_FAST_BACKEND``); the saved backend when a
    one-token forward on ``device`` runs with it; else None ("auto"). So a checkpoint trained with
    the triton or cuda backend loads on a CPU.
    """
    from ..backend import BackendUnavailableError, get_backend, validate_backend

    config = TrainConfig.from_dict(payload["config"])
    if backend is not None:
        config.backend = validate_backend(backend, argument="--backend")
    elif get_backend() != "auto":
        config.backend = None
    model = build_model(config)
    load_weights(model, payload["model"], path)
    model = model.to(device).eval()
    if backend is None and model.backend not in (None, "auto"):
        try:
            with torch.no_grad():
                model(torch.zeros(1, 1, dtype=torch.long, device=device))
        except BackendUnavailableError:
            model.backend = None  # the saved preference cannot run here: auto
    return model
