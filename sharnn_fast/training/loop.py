"""The training loop (the SHA-RNN paper's enwik8 recipe), and the bodies of ``sharnn train`` and
``sharnn eval`` (:func:`train`, :func:`evaluate_checkpoint`). The scoring loop itself is
:mod:`.evaluation`; dynamic evaluation, :mod:`.dynamic`.

Recipe (Merity 2019, arXiv:1911.11423, and its published training script; see docs and
docs/model.md, "The paper's recipe"): LAMB with the weight norm clamped at 10 in the trust ratio
and a minimum trust ratio of 0.25, linear warmup then a
constant lr, gradient clipping at 0.25, random sequence lengths around bptt, hidden state and
attention memory carried from segment to segment and detached, evaluation carrying state across
the whole split. Additions: gradient accumulation, bf16/fp16 autocast, torch.compile, DDP, exact
resume, signal-safe checkpoints.
"""
from __future__ import annotations

import contextlib
import math
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import autotuning
from .._files import WriteError
from ..backend import explain, get_backend
from . import distributed
from .compiling import CompiledStep, RecompileLimitNotice
from .checkpoint import (check_architecture, describe_tensors, load_weights, model_from_checkpoint,
                         non_finite_tensors, read_checkpoint, save_checkpoint)
from .config import (ARCHITECTURE_KEYS, TrainConfig, autocast_context, build_model, default_precision, default_preset,
                     preset_config, validate)
from .data import BatchStream, check_same_data, load_corpus
from .dynamic import evaluate_dynamic
from .errors import Interrupted, StorageError, UserInputError
from .evaluation import detached, evaluate, score_segments
from .optim import build_optimizer, learning_rate, optimizer_state_problem
from .report import MetricsLog, Progress, bits_per_byte, summary_text
from .run_folder import RunFolder, complete_run_message


class TrainingDiverged(RuntimeError):
    """The training loss, the gradient norm or the weights became NaN or inf; the message names the
    step and the last good checkpoint (checkpoints never hold non-finite weights)."""


def make_config(preset: Optional[str], overrides: dict, resumed: Optional[dict] = None,
                resume_path=None) -> TrainConfig:
    """The run's configuration: a preset (default: "tiny" on a CPU, "paper" on a GPU), or the
    resumed checkpoint's config, then every flag given explicitly (``overrides``). --max-steps
    given alone drops the preset's epochs and --epochs alone its max steps. On resume, an
    architecture flag (or preset) that differs from the checkpoint raises UserInputError."""
    if resumed is None:
        config = preset_config(preset or default_preset())
    else:
        config = TrainConfig.from_dict(resumed)
        if preset is not None:
            for key, value in preset_config(preset).to_dict().items():
                if key in ARCHITECTURE_KEYS or key == "preset":
                    setattr(config, key, value)
    if "max_steps" in overrides and "epochs" not in overrides:
        config.epochs = None
    if "epochs" in overrides and "max_steps" not in overrides:
        config.max_steps = None
    for key, value in overrides.items():
        setattr(config, key, value)
    validate(config)
    if resumed is not None:
        check_architecture(resumed, config, resume_path)
    return config


def gradient_norm(parameters: list, clip: float) -> torch.Tensor:
    """The total L2 norm of the gradients (a 0-dim tensor, left on the device: no synchronisation),
    clipping them to ``clip`` when it is > 0. NaN or inf when any gradient is."""
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(parameters, clip)
    norms = [torch.linalg.vector_norm(p.grad).float() for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


# The published random segment length (the paper's recipe, docs/model.md): bptt with probability
# FULL_LENGTH_P, else bptt * SHORT_LENGTH_FRACTION; then Normal(that, LENGTH_STD), at least MIN_LENGTH.
FULL_LENGTH_P = 0.95
SHORT_LENGTH_FRACTION = 0.5
LENGTH_STD = 5.0
MIN_LENGTH = 5


def draw_sequence_length(bptt: int, generator: torch.Generator) -> int:
    """The published random segment length: bptt with probability 0.95, else bptt / 2; then
    Normal(that, std 5), rounded down, at least 5, at most bptt (docs/model.md)."""
    full = torch.rand((), generator=generator).item() < FULL_LENGTH_P
    base = bptt if full else bptt * SHORT_LENGTH_FRACTION
    return min(bptt, max(MIN_LENGTH, int(torch.normal(float(base), LENGTH_STD, (1,), generator=generator).item())))


def mean_sequence_length(bptt: int) -> float:
    """The mean of :func:`draw_sequence_length`'s base length, in bytes: the drawn lengths' mean
    within 3 bytes (rounding down and the cap at bptt take a little off). For estimating the steps
    of an epoch."""
    return bptt * (FULL_LENGTH_P + (1 - FULL_LENGTH_P) * SHORT_LENGTH_FRACTION)


class NextByteLoss(nn.Module):
    """The model, its decoder and the cross-entropy as one module, so that DDP and torch.compile
    see the whole step. forward(x, y, hidden, mems): x, y [T, B] long -> (mean loss in nats,
    new_hidden, new_mems)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, y, hidden=None, mems=None):
        h, hidden, mems, _, _ = self.model(x, hidden=hidden, mems=mems)
        logits = self.model.decoder(h)  # [T, B, V]
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        return loss, hidden, mems


class WindowTotals(NamedTuple):
    """What :meth:`Trainer.flush` learns from its one collective, over every rank."""
    loss_sum: float  # the window's losses (nats) times their segment lengths, summed
    stop_requests: int  # ranks that a signal asked to stop
    bad_loss: list  # the window's steps (0 = its first) whose loss was NaN or inf on some rank
    bad_norm: list  # the same for the gradient norm


def _window_totals(pending: list, stop_signal: int, ctx: distributed.Context) -> WindowTotals:
    """All-reduce one float64 vector for the steps ``pending`` [(loss, gradient norm, segment
    length)] of a flush: [loss sum, stop requests, one loss flag per step, one norm flag per step],
    summed over the ranks. The only synchronisation of a flush."""
    losses = torch.stack([loss for loss, _, _ in pending]).double()  # [steps]
    norms = torch.stack([norm.to(losses.device) for _, norm, _ in pending]).double()  # [steps]
    lengths = losses.new_tensor([n for _, _, n in pending])  # [steps]
    values = torch.cat([(losses * lengths).sum()[None], losses.new_tensor([float(bool(stop_signal))]),
                        (~torch.isfinite(losses)).double(), (~torch.isfinite(norms)).double()])
    values = distributed.all_reduce(values, ctx).tolist()
    loss_flags, norm_flags = values[2:2 + len(pending)], values[2 + len(pending):]
    return WindowTotals(loss_sum=values[0], stop_requests=round(values[1]),
                        bad_loss=[i for i, flag in enumerate(loss_flags) if flag],
                        bad_norm=[i for i, flag in enumerate(norm_flags) if flag])


@contextlib.contextmanager
def autotuning_on(enabled: bool):
    """Autotuning on for the block when ``enabled``, and afterwards back to the process's default
    (``autotuning.autotune(None)``: SHARNN_FAST_AUTOTUNE, else off); "auto" then measures each op's
    backends the first time it meets a shape bucket (see sharnn_fast.autotuning). When not
    ``enabled`` the switch stays as it is."""
    if not enabled:
        yield
        return
    autotuning.autotune(True)
    try:
        yield
    finally:
        autotuning.autotune(None)


class Trainer:
    """One run: the model, optimizer, data streams and every piece of state that makes resume exact.

    train_step() does one optimizer step; run() drives the steps, logging, evaluation, checkpoints
    and stopping. See :mod:`sharnn_fast.training.checkpoint` for what a checkpoint holds.
    """

    def __init__(self, config: TrainConfig, ctx: distributed.Context, *, save_dir: Optional[Path],
                 resume: Optional[dict] = None, resume_path=None, reseed: bool = False, progress: bool = True):
        c = self.config = config
        self.ctx, self.device = ctx, ctx.device
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.precision = c.precision or default_precision(self.device)
        if self.precision == "fp16" and self.device.type != "cuda":
            raise UserInputError("--precision fp16 needs a CUDA device (it trains with a GradScaler); "
                                 "on a CPU use fp32 or bf16")

        corpus = load_corpus(c.data, c.split)
        if resume is not None and resume.get("data"):
            check_same_data(resume["data"], corpus.digests, resume_path)
        self.data_description, self.data_digests = corpus.description, corpus.digests
        self.train_stream = BatchStream(corpus.splits["train"], c.batch_size, rank=ctx.rank,
                                        world_size=ctx.world_size, split="train", min_length=c.bptt + 1)
        self.eval_streams = {split: BatchStream(corpus.splits[split], c.eval_batch_size, rank=ctx.rank,
                                                world_size=ctx.world_size, split=split)
                             for split in ("valid", "test")}

        torch.manual_seed(c.seed)  # the same initial weights on every rank
        self.model = build_model(c).to(self.device)
        self.parameters = list(self.model.parameters())  # listed once: walking the modules every step costs
        self.optimizer = build_optimizer(c.optimizer, self.parameters, lr=c.lr, weight_decay=c.wdecay)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.lengths = torch.Generator().manual_seed(c.seed)  # identical on every rank
        torch.manual_seed(c.seed + ctx.rank)  # dropout: each rank its own masks
        if self.device.type == "cuda":
            torch.cuda.manual_seed(c.seed + ctx.rank)

        self.step = self.epoch = self.position = self.tokens = 0
        self.elapsed_before = 0.0
        self.best_valid_bpc: Optional[float] = None
        self.best_step: Optional[int] = None
        self.carry: Optional[list] = None  # per micro-batch: (hidden, mems), or None at an epoch start
        self.pending: list = []  # (loss tensor, tokens) of the steps since the last flush
        self.stop_signal = 0  # set by SIGINT/SIGTERM on this rank
        self.stop_agreed = False  # every rank has seen a stop request (at a flush)
        self.lr = 0.0
        self._started = self._last_log_time = time.perf_counter()  # run() starts the clock again
        self.last_valid: Optional[dict] = None  # the last valid evaluation's event (step, loss, bpc, ...)
        # (path, step) of the newest checkpoint known to be good: the last save, else the one resumed
        self.last_good: Optional[tuple] = None
        self.notices: list[str] = []
        if resume is not None:
            self._restore(resume, resume_path)
            if reseed:
                self._reseed()
            if resume_path is not None:
                self.last_good = (Path(resume_path), self.step)

        self.loss_module = NextByteLoss(self.model)
        self.ddp = distributed.wrap(self.loss_module, ctx)
        # --compile: lengths and memory symbolic, a bounded number of graphs (training/compiling.py)
        self.forward = CompiledStep(self.ddp, self.model.num_max_positions) if c.compile else self.ddp
        self.autocast = autocast_context(self.device, self.precision)
        # Autotuning (autotuning.py): on by default where a GPU trains. It tunes at the first step,
        # where every op first runs with the real segment length, batch, dtype and mode.
        self.autotune = c.autotune if c.autotune is not None else self.device.type == "cuda"
        self.autotune_reported = False
        self.metrics = MetricsLog(self.save_dir, ctx.is_main) if self.save_dir is not None else None
        self.progress = Progress(total=self.total_steps(), initial=self.step, enabled=ctx.is_main and progress)

    # --- state ---------------------------------------------------------------------------------

    @property
    def micro_batch(self) -> int:
        return self.config.batch_size // self.config.accumulate

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.ctx.world_size

    def steps_per_epoch_estimate(self) -> int:
        return max(1, math.ceil((self.train_stream.length - 1) / mean_sequence_length(self.config.bptt)))

    def total_steps(self) -> Optional[int]:
        c = self.config
        by_epochs = c.epochs * self.steps_per_epoch_estimate() if c.epochs is not None else None
        candidates = [n for n in (c.max_steps, by_epochs) if n is not None]
        return min(candidates) if candidates else None

    def _carry_for_checkpoint(self):
        """The carried state of the global batch (all ranks, columns in order), or None."""
        if self.carry is None:
            return None
        blocks = range(len(self.carry[0][0]))

        def columns(tensors):
            return distributed.all_gather_cat(torch.cat(tensors, dim=1), self.ctx, dim=1)
        hidden = [tuple(columns([part[0][i][j] for part in self.carry]) for j in range(2)) for i in blocks]
        mems = [columns([part[1][i] for part in self.carry]) if torch.is_tensor(self.carry[0][1][i]) else None
                for i in blocks]
        return dict(hidden=hidden, mems=mems)

    def _carry_from_checkpoint(self, carry):
        def mine(t, k):  # rank's columns, then micro-batch k's share of them
            start = self.ctx.rank * self.config.batch_size + k * self.micro_batch
            return t.narrow(1, start, self.micro_batch).to(self.device)
        return [([(mine(h, k), mine(c, k)) for h, c in carry["hidden"]],
                 [mine(m, k) if m is not None else [] for m in carry["mems"]])
                for k in range(self.config.accumulate)]

    def checkpoint_payload(self) -> dict:
        """Everything resume needs (collective: every rank must call it)."""
        rng = dict(torch_cpu=distributed.all_gather_cat(torch.get_rng_state()[None], self.ctx, dim=0),
                   cuda=(distributed.all_gather_cat(torch.cuda.get_rng_state(self.device)[None], self.ctx, dim=0)
                         if self.device.type == "cuda" else None),
                   lengths=self.lengths.get_state())
        last_valid = {k: self.last_valid[k] for k in ("step", "loss", "bpc")} if self.last_valid else None
        progress = dict(step=self.step, epoch=self.epoch, position=self.position, tokens=self.tokens,
                        elapsed_s=self.elapsed(), best_valid_bpc=self.best_valid_bpc, best_step=self.best_step,
                        last_valid=last_valid, lr=self.lr, world_size=self.ctx.world_size,
                        global_batch=self.global_batch)
        return dict(config=self.config.to_dict(), model=self.model.state_dict(),
                    optimizer=self.optimizer.state_dict(),
                    scaler=self.scaler.state_dict() if self.scaler is not None else None,
                    progress=progress, rng=rng, carry=self._carry_for_checkpoint(), data=self.data_digests)

    def _restore(self, payload: dict, path) -> None:
        """Continue from checkpoint ``payload`` (read from ``path``). Raises UserInputError when its
        state does not fit this run: weights or optimizer state of other shapes, another
        optimizer's state, a malformed progress, random or carried state (a checkpoint edited, or
        written by other code: each would otherwise fail at the first step)."""
        load_weights(self.model, payload["model"], path)
        try:
            self._restore_state(payload)
        except (KeyError, TypeError, IndexError, AttributeError, RuntimeError) as err:
            raise UserInputError(f"{path}: its training state cannot be restored ({type(err).__name__}: "
                                 f"{' '.join(str(err).split())})") from None
        problem = optimizer_state_problem(self.config.optimizer, self.optimizer)
        if problem:
            raise UserInputError(f"{path}: its optimizer state does not fit --optimizer {self.config.optimizer} "
                                 f"({problem}): was it edited? Start a new run, or resume another checkpoint")

    def _restore_state(self, payload: dict) -> None:
        saved_optimizer = payload["config"].get("optimizer")
        if saved_optimizer != self.config.optimizer:  # torch would load another optimizer's groups and fail later
            raise UserInputError(f"the checkpoint was trained with --optimizer {saved_optimizer}; its optimizer "
                                 f"state cannot continue as --optimizer {self.config.optimizer}: drop the flag")
        if self.config.optimizer == "lamb" and not all(
                "max_weight_norm" in group for group in payload["optimizer"].get("param_groups", [])):
            self.notices.append("the checkpoint's LAMB did not clamp the weight norm at 10 (sharnn_fast 0.1); "
                                "it continues with the published clamp, so its steps differ from the old rule's")
        try:
            self.optimizer.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError) as err:
            raise UserInputError(f"the checkpoint's optimizer state does not fit --optimizer "
                                 f"{self.config.optimizer}: {err}") from None
        for group in self.optimizer.param_groups:  # the saved groups would bring back the old --wdecay
            group["weight_decay"] = self.config.wdecay
        if self.scaler is not None and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        p = payload["progress"]
        self.step, self.epoch, self.position, self.tokens = p["step"], p["epoch"], p["position"], p["tokens"]
        self.elapsed_before = p["elapsed_s"]
        self.best_valid_bpc, self.best_step = p["best_valid_bpc"], p["best_step"]
        self.last_valid = p.get("last_valid")  # missing (sharnn_fast 0.1): unknown, so evaluated again if due
        self.lr = p.get("lr", 0.0)  # the last step's, which evaluation events report
        self.lengths.set_state(payload["rng"]["lengths"])
        if p["world_size"] == self.ctx.world_size:
            torch.set_rng_state(payload["rng"]["torch_cpu"][self.ctx.rank].clone())
            if self.device.type == "cuda" and payload["rng"]["cuda"] is not None:
                torch.cuda.set_rng_state(payload["rng"]["cuda"][self.ctx.rank].clone(), self.device)
        else:
            self.notices.append(f"resumed on {self.ctx.world_size} ranks from a run on {p['world_size']}: "
                                f"dropout draws new random numbers (the run is not an exact continuation)")
        if payload["carry"] is not None and p["global_batch"] == self.global_batch:
            self.carry = self._carry_from_checkpoint(payload["carry"])
        elif payload["carry"] is not None:
            self.notices.append(f"the global batch changed ({p['global_batch']} -> {self.global_batch}): "
                                f"the carried hidden state and memory start afresh")
        if self.position >= self.train_stream.length - 1:
            raise UserInputError(f"the checkpoint stopped at byte {self.position:,} of each training column, "
                                 f"past the end of this data's columns ({self.train_stream.length:,} bytes): "
                                 f"resume with the same --data and --batch_size")

    def _reseed(self) -> None:
        """--seed given on resume (the paper's second stage: seed 125): the weights, optimizer,
        schedule and data position continue, but dropout and the sequence lengths draw afresh from
        the new seed, as a fresh run with that seed would."""
        c = self.config
        self.lengths.manual_seed(c.seed)
        torch.manual_seed(c.seed + self.ctx.rank)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(c.seed + self.ctx.rank)
        self.notices.append(f"--seed {c.seed}: dropout and sequence lengths draw from the new seed (weights, "
                            f"optimizer and data position continue; not an exact continuation)")

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self._started

    # --- one step ------------------------------------------------------------------------------

    def train_step(self) -> None:
        """One optimizer step over the next segment of every column: a random length, the lr of the
        schedule, ``accumulate`` micro-batches (each its own columns and carried state), clipping,
        the optimizer; then the state moves on (a new epoch resets it)."""
        c = self.config
        x, y = self.train_stream.segment(self.position, draw_sequence_length(c.bptt, self.lengths), self.device)
        lr = learning_rate(self.step + 1, lr=c.lr, warmup=c.warmup, schedule=c.schedule,
                           total_steps=c.max_steps, epoch=self.epoch, when=c.when)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        carry = self.carry or [(None, None)] * c.accumulate
        new_carry, step_loss = [], 0.0
        for k, (hidden, mems) in enumerate(carry):
            columns = slice(k * self.micro_batch, (k + 1) * self.micro_batch)
            last = k == c.accumulate - 1
            with (self.ddp.no_sync() if self.ctx.enabled and not last else contextlib.nullcontext()):
                with self.autocast:
                    loss, hidden, mems = self.forward(x[:, columns], y[:, columns], hidden, mems)
                scaled = loss / c.accumulate if c.accumulate > 1 else loss
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            new_carry.append(detached(hidden, mems))
            step_loss = step_loss + loss.detach()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = gradient_norm(self.parameters, c.clip)
        if self.scaler is not None:
            grad_norm = None  # an inf gradient is the GradScaler's business: it skips the step and lowers the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

        length = x.shape[0]
        self.pending.append((step_loss / c.accumulate if c.accumulate > 1 else step_loss,
                             grad_norm if grad_norm is not None else torch.zeros(()), length))
        self.lr = lr
        self.step += 1
        self.tokens += length * self.global_batch
        self.position += length
        self.carry = new_carry
        if self.position >= self.train_stream.length - 1:  # the published loop: a fresh state each epoch
            self.epoch, self.position, self.carry = self.epoch + 1, 0, None

    # --- the run -------------------------------------------------------------------------------

    def flush(self) -> Optional[dict]:
        """Check and log the steps since the last flush (one synchronisation, one collective).
        Raises TrainingDiverged at the first step whose loss or gradient norm is NaN or inf, after
        logging that window's train event. Returns the train event, or None.

        A non-finite gradient norm stops the run rather than skipping the step: with a finite loss
        it means the activations or weights are already at the edge of overflow, so a skipped step
        would hide a diverging run (and an exact resume would meet the same segment again). Every
        checkpoint is saved after a flush, so the last one predates the bad step. (fp16 is the
        exception: its GradScaler skips steps with inf gradients by design.)"""
        if not self.pending:  # the same on every rank: they all step alike
            return None
        lengths = [n for _, _, n in self.pending]
        totals = _window_totals(self.pending, self.stop_signal, self.ctx)
        first_step = self.step - len(lengths) + 1
        self.pending = []
        if totals.stop_requests:
            self.stop_agreed = True
            self.stop_signal = self.stop_signal or int(signal.SIGTERM)  # another rank was told to stop
        now = time.perf_counter()
        tokens_per_s = sum(lengths) * self.global_batch / max(now - self._last_log_time, 1e-9)
        self._last_log_time = now
        loss = totals.loss_sum / (sum(lengths) * self.ctx.world_size)
        event = dict(step=self.step, split="train", loss=loss, bpc=bits_per_byte(loss), lr=self.lr,
                     tokens_per_s=tokens_per_s, epoch=self.epoch, tokens=self.tokens, time_s=self.elapsed())
        bad_loss, bad_norm = totals.bad_loss, totals.bad_norm
        if bad_loss or bad_norm:
            self._log(event)
            if bad_norm and (not bad_loss or bad_norm[0] < bad_loss[0]):
                what = f"the gradient norm became NaN or inf at step {first_step + bad_norm[0]} (its loss was finite)"
            else:
                what = f"the training loss became NaN or inf at step {first_step + bad_loss[0]}"
            raise TrainingDiverged(f"{what}: stopped{self._last_good()}. Try a lower --lr or more --warmup")
        return event

    def _last_good(self) -> str:
        if self.last_good is None:
            return "; no checkpoint was saved before it"
        return f"; the last good checkpoint is {self.last_good[0]} (step {self.last_good[1]})"

    def _log(self, event: Optional[dict]) -> None:
        if event is not None:
            self.progress.log(event)
            self._write_metrics(event)

    def _write_metrics(self, event: dict) -> None:
        if self.metrics is not None:
            try:
                self.metrics.write(event)
            except WriteError as err:
                raise StorageError(f"{err}; stopped at step {self.step}{self._intact()}") from err

    def evaluate_split(self, split: str) -> dict:
        started = time.perf_counter()
        loss, count = evaluate(self.model, self.eval_streams[split], bptt=self.config.bptt,
                               precision=self.precision, ctx=self.ctx)
        seconds = time.perf_counter() - started
        self._last_log_time += seconds  # evaluation time does not count against training throughput
        event = dict(step=self.step, split=split, loss=loss, bpc=bits_per_byte(loss), lr=self.lr,
                     tokens_per_s=count / max(seconds, 1e-9), epoch=self.epoch, tokens=count, time_s=self.elapsed())
        self._log(event)
        return event

    def validate_and_save(self) -> dict:
        self.check_weights()
        event = self.evaluate_split("valid")
        if not math.isfinite(event["bpc"]):  # weights that are finite but overflow: no checkpoint of them either
            raise TrainingDiverged(f"the valid loss became NaN or inf at step {self.step} (the weights are finite "
                                   f"but overflow the forward pass): not saved, stopped{self._last_good()}. "
                                   f"Try a lower --lr or more --warmup")
        improved = self.best_valid_bpc is None or event["bpc"] < self.best_valid_bpc
        if improved:
            self.best_valid_bpc, self.best_step = event["bpc"], self.step
        self.last_valid = event  # before saving: the checkpoint records that this step was evaluated
        self.save(best=improved)
        return event

    def save(self, best: bool = False) -> None:
        if self.save_dir is None:
            return
        self.check_weights()
        payload = self.checkpoint_payload()
        if self.ctx.is_main:
            try:
                save_checkpoint(self.save_dir / "last.pt", payload)
                if best:
                    save_checkpoint(self.save_dir / "best.pt", payload)
            except WriteError as err:
                raise StorageError(f"{err}; stopped at step {self.step}{self._intact()}") from err
        self.last_good = (self.save_dir / "last.pt", self.step)

    def _intact(self) -> str:
        if self.last_good is None:
            return " (no checkpoint was saved before)"
        return f"; {self.last_good[0]} (step {self.last_good[1]}) is intact"

    def check_weights(self) -> None:
        """Raise TrainingDiverged if a weight is NaN or inf (a step whose loss and gradient were
        finite can still overflow them). Every rank holds the same weights: they all stop together."""
        bad = non_finite_tensors(self.model.state_dict())
        if bad:
            raise TrainingDiverged(f"the weights became NaN or inf by step {self.step} ({describe_tensors(bad)}) "
                                   f"while the loss was still finite: not saved, stopped{self._last_good()}. "
                                   f"Try a lower --lr or more --warmup")

    def finished(self) -> bool:
        return run_finished(self.config, self.step, self.epoch)

    def valid_due(self) -> bool:
        """An evaluation step whose evaluation has not been made: a run stopped by a signal right
        after it saves without evaluating, and its resume evaluates first."""
        return (self.step > 0 and self.step % self.config.eval_interval == 0
                and (self.last_valid is None or self.last_valid["step"] != self.step))

    def run(self) -> dict:
        """Train until --max-steps or --epochs, a signal, or a NaN; returns the summary dict
        (``exit_code`` 0 when finished, 128 + signal number when stopped by SIGINT/SIGTERM)."""
        self._started = self._last_log_time = time.perf_counter()
        self.progress.message(self.startup_line())
        for notice in self.notices:
            self.progress.message(f"note: {notice}")
        notice = RecompileLimitNotice(self.progress.message).install() if self.config.compile else None
        with self._signals_caught(), autotuning_on(self.autotune):
            try:
                if not self.finished() and self.valid_due():
                    self.validate_and_save()
                while not self.finished() and self.advance():
                    pass
                self._log(self.flush())
            finally:
                self.progress.close()
                if notice is not None:
                    notice.remove()
        if self.stop_signal:
            try:
                self.save()
            except StorageError as err:  # still the signal's exit status (143 for SIGTERM)
                raise Interrupted(self.stop_signal, str(err)) from err
            return self._summary(stopped=f"stopped by {signal.Signals(self.stop_signal).name}",
                                 exit_code=128 + int(self.stop_signal))
        valid = self.last_valid
        if valid is None or valid["step"] != self.step:
            valid = self.validate_and_save()
        test = self.evaluate_split("test")
        return self._summary(stopped="finished", valid=valid, test=test, exit_code=0)

    def startup_line(self) -> str:
        """What runs, printed before the first step: preset, device, CPU threads, precision,
        backend, data and where the checkpoints go."""
        c = self.config
        processes = f" x {self.ctx.world_size} processes" if self.ctx.world_size > 1 else ""
        threads = torch.get_num_threads()
        start = f"from step {self.step:,}" if self.step else "from scratch"
        return (f"sharnn train: preset {c.preset}, {self.device}{processes}, {threads} CPU thread"
                f"{'s' if threads != 1 else ''}, {self.precision}, backend {c.backend or 'auto'}"
                f"{' (autotuned at the first step)' if self.autotune else ''}, {start}; data: "
                f"{self.data_description}; saving to {self.save_dir if self.save_dir is not None else 'nowhere'}")

    def report_autotuning(self, seconds: float, length: int) -> dict:
        """After the first step of a tuned run: one line (and a metrics.jsonl event, split
        "autotune") with what was measured, what was chosen and how long tuning took."""
        backend = self.config.backend or get_backend()
        choices = {}
        if backend != "auto":
            text = f"autotune: nothing tuned, --backend {backend} was asked for (only auto is tuned)"
        elif self.config.compile:
            text = ("autotune: nothing tuned under --compile (ops cannot be timed while torch.compile "
                    "traces them); \"auto\" uses its static preference")
        else:
            choices = dict(line.split(": ", 1) for line in explain().splitlines() if ": " in line)
            text = (f"autotune: {seconds:.1f} s at the first step (T {length}, B {self.config.batch_size}, "
                    f"{self.precision}, training): " + "; ".join(f"{op}: {why}" for op, why in choices.items()))
        self.progress.message(text)
        return dict(step=self.step, split="autotune", seconds=round(seconds, 3), backend=backend,
                    precision=self.precision, segment_length=length, choices=choices)

    def report_compilation(self, seconds: float, length: int) -> None:
        """After a step under --compile: one line (and a metrics.jsonl event, split "compile") for
        each graph torch.compile compiled in it, with the step's time, compiling included."""
        for graph, T, memory in self.forward.new_graphs():
            self.progress.message(f"torch.compile: graph {graph} compiled at step {self.step:,} (segment length "
                                  f"{T}, memory {memory}; the step took {seconds:.1f} s); lengths and memory "
                                  "stay symbolic, so a new length does not recompile")
            self._write_metrics(dict(step=self.step, split="compile", graph=graph, segment_length=T,
                                     memory=memory, seconds=round(seconds, 3)))

    def advance(self) -> bool:
        """One turn of the loop: a step, then logging and evaluation when their interval comes.
        Returns False when a signal asked the run to stop (several ranks stop together, at a
        flush where they all agreed to)."""
        c = self.config
        tuned_before, tokens_before = autotuning.tuning_seconds(), self.tokens
        started = time.perf_counter()
        self.train_step()
        if self.config.compile:
            self.report_compilation(time.perf_counter() - started, (self.tokens - tokens_before) // self.global_batch)
        if self.autotune and not self.autotune_reported:  # the first step of this run
            self.autotune_reported = True
            event = self.report_autotuning(autotuning.tuning_seconds() - tuned_before,
                                           (self.tokens - tokens_before) // self.global_batch)
            self._write_metrics(event)
        self.progress.step()
        if self.step % c.log_interval == 0:
            self._log(self.flush())
        if self.should_stop():
            return False
        if self.step % c.eval_interval == 0:
            self._log(self.flush())
            self.validate_and_save()
        return True

    def should_stop(self) -> bool:
        """Whether a signal asked the run to stop: on one process, as soon as it came; on several,
        once every rank knows of it (:meth:`flush` agrees on it), so that they all stop at the
        same step."""
        return self.stop_agreed if self.ctx.enabled else bool(self.stop_signal)

    @contextlib.contextmanager
    def _signals_caught(self):
        """SIGINT and SIGTERM ask the loop to save and stop after the current step; a second one
        stops at once (the last checkpoint stays intact: files are replaced atomically)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.stop_signal:
                if self.last_good is None:
                    raise Interrupted(signum, "stopped at once, before any checkpoint was saved")
                path, step = self.last_good
                raise Interrupted(signum, f"stopped at once, without saving: {path} holds step {step}; "
                                          f"resume with sharnn train --resume {path}")
            self.stop_signal = signum
            self.progress.message(f"{signal.Signals(signum).name}: saving a checkpoint after this step "
                                  f"(again to stop at once)")
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _summary(self, *, stopped: str, exit_code: int, valid=None, test=None) -> dict:
        elapsed = self.elapsed()
        n_params = sum(p.numel() for p in self.model.parameters())
        attn = [i for i, b in enumerate(self.model.blocks) if b.attn is not None]
        c = self.config
        summary = dict(
            stopped=stopped, exit_code=exit_code, step=self.step,
            epochs_done=self.epoch + self.position / max(1, self.train_stream.length - 1),
            tokens=self.tokens, elapsed_s=elapsed, tokens_per_s=self.tokens / max(elapsed, 1e-9),
            data=self.data_description,
            model=(f"preset {c.preset}: emsize {c.emsize}, nhid {c.nhid}, {c.nlayers} layers, attention in "
                   f"block{'s' if len(attn) != 1 else ''} {', '.join(map(str, attn)) or 'none'} (memory {c.memory}), "
                   f"{n_params / 1e6:.2f} M parameters; {c.optimizer}, {self.precision}, {self.device}, "
                   f"{self.ctx.world_size} process{'es' if self.ctx.world_size > 1 else ''}"),
            valid_bpc=valid["bpc"] if valid else None, test_bpc=test["bpc"] if test else None,
            best_valid_bpc=self.best_valid_bpc, best_step=self.best_step)
        if self.save_dir is not None:
            checkpoints = [str(self.save_dir / name) for name in ("last.pt", "best.pt")
                           if (self.save_dir / name).exists()]
            summary.update(save=str(self.save_dir), checkpoints=checkpoints,
                           metrics=str(self.save_dir / "metrics.jsonl"))
            if exit_code:
                summary["resume_hint"] = f"sharnn train --resume {self.save_dir / 'last.pt'}"
        return summary


def run_finished(config: TrainConfig, step: int, epoch: int) -> bool:
    """Whether a run at ``step`` (``epoch`` epochs finished) has reached --max-steps or --epochs."""
    return ((config.max_steps is not None and step >= config.max_steps)
            or (config.epochs is not None and epoch >= config.epochs))


def default_save_dir(config: TrainConfig) -> Path:
    return Path("sharnn-runs") / f"{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def make_save_dir(save_dir: Path) -> None:
    """Create the --save folder (and its parents) and check that a file can be created in it, so
    that a folder the run cannot write stops it now, not at its first checkpoint or log line.
    Raises UserInputError naming the folder and the reason (a path through a file, a read-only
    file system, no permission, /proc)."""
    if save_dir.exists() and not save_dir.is_dir():
        raise UserInputError(f"--save {save_dir} exists and is not a folder")
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=save_dir, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UserInputError(f"--save {save_dir}: cannot write there ({err.strerror or err}); "
                             f"choose a folder you can write") from None


def train(preset: Optional[str] = None, overrides: Optional[dict] = None, *, save_dir=None,
          resume_path=None, progress: bool = True, overwrite: bool = False) -> dict:
    """Train: the preset (or the checkpoint at ``resume_path``) with the explicitly given
    ``overrides`` (TrainConfig fields; see :func:`make_config`), in a single process or, under
    torchrun, with DDP. Writes last.pt, best.pt and metrics.jsonl to ``save_dir`` (default: the
    resumed checkpoint's folder, else sharnn-runs/PRESET-TIME), prints the summary on rank 0 and
    returns it as a dict (``exit_code``: 0 finished, 128 + signal when stopped by one).
    A resume continues exactly, random generators included, unless ``overrides`` holds a seed:
    then dropout and the sequence lengths start afresh from it (the paper's second stage).

    The folder (:mod:`.run_folder`): locked for the run (rank 0); a folder that holds another run
    is refused unless ``overwrite`` (which deletes its last.pt, best.pt and metrics.jsonl); a
    resume into the checkpoint's own folder moves what it replaces aside; a resume into another
    folder starts its best afresh. A resume of a complete run changes nothing and returns
    ``{"stopped": "already complete", "exit_code": 0, ...}``.
    Raises UserInputError for bad input (a folder in use or holding a run among them) and
    TrainingDiverged on a NaN or inf loss."""
    resume = read_checkpoint(resume_path) if resume_path is not None else None
    config = make_config(preset, dict(overrides or {}), resume["config"] if resume else None, resume_path)
    if save_dir is None:
        save_dir = Path(resume_path).parent if resume_path is not None else default_save_dir(config)
    save_dir = Path(save_dir)
    ctx = distributed.setup(config.device)
    folder = None
    try:
        # Rank 0 alone reads and changes the folder; every rank then acts on what it decided.
        plan = None
        if ctx.is_main:
            try:
                p = resume["progress"] if resume is not None else None
                complete = complete_run_message(resume_path, p, run_finished(config, p["step"], p["epoch"])) \
                    if resume is not None else None
                if complete is None:
                    make_save_dir(save_dir)  # created, and writable, before the first step
                    folder = RunFolder(save_dir, resume=resume, resume_path=resume_path, overwrite=overwrite).open()
                plan = dict(complete=complete, notes=folder.notes if folder else [],
                            same_folder=folder.same_folder if folder else True)
            except Exception as err:  # every rank stops with it, rather than wait for rank 0 in a collective
                distributed.broadcast_object(dict(error=str(err), user=isinstance(err, UserInputError)), ctx)
                raise
        plan = distributed.broadcast_object(plan, ctx)
        if "error" in plan:
            raise (UserInputError if plan["user"] else RuntimeError)(plan["error"])
        if plan["complete"] is not None:
            if ctx.is_main:
                print(plan["complete"], flush=True)
            return dict(stopped="already complete", exit_code=0, step=resume["progress"]["step"],
                        checkpoint=str(resume_path))
        trainer = Trainer(config, ctx, save_dir=save_dir, resume=resume, resume_path=resume_path,
                          reseed=resume is not None and "seed" in (overrides or {}), progress=progress)
        trainer.notices[:0] = plan["notes"]
        if not plan["same_folder"]:  # a new history: best.pt here is the best of this run's evaluations
            trainer.best_valid_bpc = trainer.best_step = None
        summary = trainer.run()
        distributed.barrier(ctx)
        if ctx.is_main:
            print(summary_text(summary), flush=True)
        return summary
    finally:
        if folder is not None:
            folder.close()
        distributed.teardown(ctx)


def evaluate_checkpoint(path, *, data=None, split: str = "valid", batch_size: int = 10,
                        device: Optional[str] = None, precision: Optional[str] = None,
                        backend: Optional[str] = None, dynamic=None, progress: bool = False) -> dict:
    """Bits per byte of a checkpoint on one split: ``{"split", "bpc", "loss" (nats per byte),
    "tokens" (bytes predicted), "seconds", "tokens_per_s", "checkpoint", "step", "data",
    "processes", "precision"}``, and with ``dynamic`` (a :class:`~.dynamic.DynamicEval`) also
    ``"dynamic"``: the same split evaluated dynamically (see
    :func:`~.dynamic.evaluate_dynamic` for its fields), after the static pass, from the same
    weights. The checkpoint file is only read.

    data: a prepared folder or a file; None uses the data the checkpoint was trained on. Segments
    of the checkpoint's bptt, state carried across the split (see :func:`evaluate`), ``batch_size``
    columns (the published script uses 10 for valid and 1 for test; 1 gives every byte the longest
    context). Under torchrun ``batch_size`` counts the columns of all processes together, shared
    out among them, so any number of processes scores the same bytes (and gives the same bpc, to
    float rounding); every rank returns the same result. precision: None is fp32 on a CPU, fp16 on
    a GPU (:func:`~.config.default_precision`). backend: None is the checkpoint's where it runs,
    else auto (see :func:`~.checkpoint.model_from_checkpoint`). Dynamic evaluation with the rms
    method takes its gradient statistics from the train split of the same data, cut into the same
    columns. progress: tqdm bars on rank 0 when stderr is a terminal.

    Raises UserInputError: a bad argument, checkpoint or data; fewer columns than processes; the
    rms method on the train split (its statistics would see text before it is scored).
    """
    if split not in ("train", "valid", "test"):
        raise UserInputError(f"--split must be train, valid or test, got {split!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserInputError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if dynamic is not None and dynamic.method == "rms" and split == "train":
        raise UserInputError("--dynamic-method rms collects its gradient statistics on the train split, so it "
                             "cannot evaluate the train split without seeing text before scoring it: use "
                             "--split valid or test, or --dynamic-method sgd")
    payload = read_checkpoint(path)
    config = TrainConfig.from_dict(payload["config"])
    ctx = distributed.setup(device)
    try:
        precision = precision or default_precision(ctx.device)
        if precision == "fp16" and ctx.device.type != "cuda":
            raise UserInputError("--precision fp16 needs a CUDA device; on a CPU use fp32 or bf16")
        corpus = load_corpus(data if data is not None else config.data, config.split)

        def columns_of(name):
            return BatchStream(corpus.splits[name], batch_size, rank=ctx.rank, world_size=ctx.world_size,
                               split=name, shared=True)
        stream = columns_of(split)
        model = model_from_checkpoint(payload, path, ctx.device, backend)
        static = score_segments(model, stream, bptt=config.bptt, precision=precision, ctx=ctx,
                                progress="static evaluation" if progress else None)
        adapted = None
        if dynamic is not None:
            adapted = evaluate_dynamic(model, stream, dynamic, bptt=config.bptt, precision=precision, ctx=ctx,
                                       stats_stream=columns_of("train") if dynamic.method == "rms" else None,
                                       progress=progress)
        distributed.barrier(ctx)
        if not math.isfinite(static["loss"]):
            raise UserInputError(f"{path}: the loss over the {split} split came out {static['loss']} although every "
                                 f"weight is finite (precision {precision}): an activation overflowed; try "
                                 f"--precision fp32")
        if adapted is not None and not math.isfinite(adapted["loss"]):
            raise UserInputError(f"{path}: dynamic evaluation diverged (its loss over the {split} split came out "
                                 f"{adapted['loss']}; static: {bits_per_byte(static['loss']):.4f} bpc): try a "
                                 f"smaller --dynamic-lr or a larger --dynamic-decay")
    finally:
        distributed.teardown(ctx)
    result = dict(split=split, bpc=bits_per_byte(static["loss"]), loss=static["loss"], tokens=static["tokens"],
                  seconds=static["seconds"], tokens_per_s=static["tokens"] / max(static["seconds"], 1e-9),
                  checkpoint=str(path), step=payload["progress"]["step"], data=corpus.description,
                  processes=ctx.world_size, precision=precision)
    if adapted is not None:
        result["dynamic"] = adapted
    return result
