"""The ``sharnn`` command (also ``python -m sharnn_fast``): prepare, train, eval, generate, plot.

This layer only parses arguments, calls :mod:`sharnn_fast.training` and prints. Bad input gets one
line on stderr and exit status 2, never a traceback (set SHARNN_DEBUG=1 to see one).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

EXAMPLES = """\
examples:
  sharnn train                                  # the tiny preset on the embedded corpus (CPU)
  sharnn prepare enwik8.zip data/enwik8         # the paper's 90M/5M/5M split
  sharnn train --data data/enwik8 --preset paper --save runs/paper
  torchrun --standalone --nproc_per_node 8 -m sharnn_fast train --data data/enwik8 --preset paper
  sharnn train --resume runs/paper/last.pt      # continue exactly where it stopped
  sharnn train --resume runs/paper/best.pt --lr 1e-3 --seed 125 --epochs 37 --save runs/paper-stage2
                                                # the paper's second stage: 5 more epochs
  sharnn eval --checkpoint runs/paper/best.pt --split test --batch-size 1 --json
  sharnn eval --checkpoint runs/paper/best.pt --split test --batch-size 1 --dynamic
                                                # static and dynamic evaluation side by side
  sharnn generate --checkpoint runs/paper/best.pt --prompt "The " --max-new-tokens 500 --top-p 0.95
  sharnn plot runs/paper
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) that point at --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _checked(convert, ok, expected: str):
    """An argparse type: ``convert(text)``, accepted when ``ok(value)``, else "expected ..."."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


_non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_positive_float = _checked(float, lambda v: 0 < v < float("inf"),
                           "a number > 0 (for the most likely byte every time, use --greedy)")
_on_off = _checked(lambda text: {"on": True, "off": False}.get(text), lambda v: v is not None, "on or off")
_probability = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
_learning_rate = _checked(float, lambda v: 0 < v < float("inf"), "a learning rate > 0")
_unit_interval = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    from .training.config import PRESETS

    S = argparse.SUPPRESS  # only flags given on the command line override the preset or checkpoint
    run = p.add_argument_group("run")
    run.add_argument("--data", default=S, help="a folder written by `sharnn prepare`, or any file (split "
                     "90/5/5 on the fly; enwik8 by the paper's rule). Default: the embedded corpus")
    run.add_argument("--preset", default=None, metavar="NAME",
                     help=f"one of {', '.join(PRESETS)} (default: tiny on a CPU, paper on a GPU)")
    length = run.add_mutually_exclusive_group()
    length.add_argument("--max-steps", dest="max_steps", type=int, default=S, metavar="N",
                        help="stop after N optimizer steps in all (counting resumed ones)")
    length.add_argument("--epochs", type=int, default=S, metavar="E", help="stop after E epochs in all")
    run.add_argument("--save", default=None, metavar="DIR", help="where last.pt, best.pt and metrics.jsonl go "
                     "(default: the resumed checkpoint's folder, else sharnn-runs/PRESET-TIME). One run per folder: "
                     "a folder in use by a running `sharnn train` is refused (naming its pid), and so is a folder "
                     "that holds another run, unless --overwrite. Temporary files that killed writes left there "
                     "are removed at the start")
    run.add_argument("--overwrite", action="store_true", help="let a new run replace the run in --save (its "
                     "last.pt, best.pt and metrics.jsonl are deleted first)")
    run.add_argument("--resume", default=None, metavar="CKPT", help="continue a run exactly from its checkpoint. "
                     "Into its own folder it continues that run: from a checkpoint earlier than last.pt (e.g. "
                     "best.pt), the later last.pt and the metrics after its step are moved to "
                     "DIR/replaced-after-step-S-TIME/ (a note says so). Into another --save folder it starts a new history there (its best.pt is "
                     "the best of its own evaluations). A complete run is left as it is (exit 0)")
    run.add_argument("--seed", type=int, default=S, help="random seed of the weights, dropout and lengths "
                     "(default: the preset's, 5512 as published). With --resume: dropout and lengths start "
                     "afresh from it (the weights and optimizer continue); without, the resume is exact")
    run.add_argument("--device", default=S, help="cpu, cuda or cuda:N (default: cuda if available)")
    _add_threads(run)
    run.add_argument("--precision", default=S, metavar="fp32|bf16|fp16",
                     help="autocast dtype (default: fp16 on a GPU, as published and the fastest there, with a "
                     "GradScaler; fp32 on a CPU)")
    run.add_argument("--backend", default=S, help="kernel backend: reference, torch, triton, cuda or auto")
    run.add_argument("--autotune", type=_on_off, default=S, metavar="on|off",
                     help="measure every backend of each op at the first step (real segment length, batch, "
                     "precision, training mode), check each against torch, and let \"auto\" use the fastest; "
                     "one line and metrics.jsonl say what was measured and chosen (default: on with a GPU, "
                     "off on a CPU; only --backend auto is tuned)")
    run.add_argument("--compile", action="store_true", default=S, help="torch.compile the model and loss (for now it recompiles for each new segment length)")

    hp = p.add_argument_group("hyperparameters (published main.py names)")
    for flag, kind, text in (
            ("--emsize", _positive_int, "embedding width d"), ("--nhid", _positive_int, "Boom width"),
            ("--nlayers", _positive_int, "blocks"), ("--bptt", _positive_int, "sequence length in bytes"),
            ("--memory", _positive_int, "attention memory in positions (published: 5000)"),
            ("--batch_size", _positive_int, "columns per process (global batch = this x processes)"),
            ("--lr", float, "peak learning rate"), ("--warmup", int, "linear warmup steps"),
            ("--clip", float, "gradient norm clip (0: off)"), ("--dropout", float, "after the last block"),
            ("--dropouth", float, "inside the blocks"), ("--dropouti", float, "on the embedding"),
            ("--wdecay", float, "weight decay")):
        hp.add_argument(flag, type=kind, default=S, help=text)
    hp.add_argument("--batch-size", dest="batch_size", type=_positive_int, default=S, help=argparse.SUPPRESS)
    hp.add_argument("--optimizer", default=S, choices=("lamb", "adamw", "sgd"),
                    help="lamb (the paper's: weight norm clamped at 10, minimum trust ratio 0.25), adamw or sgd")
    hp.add_argument("--attn-layers", dest="attn_layers", default=S, metavar="all|I,J",
                    help="blocks with attention (default: the second-to-last, as published)")
    hp.add_argument("--schedule", default=S, choices=("constant", "cosine"),
                    help="after warmup: constant (published) or cosine to 0 at --max-steps")
    hp.add_argument("--when", type=int, nargs="+", default=S, metavar="EPOCH",
                    help="divide the lr by 10 after these epochs (published --when)")
    hp.add_argument("--accumulate", type=_positive_int, default=S, metavar="K",
                    help="gradient accumulation: K micro-batches of batch_size / K columns per step")
    hp.add_argument("--split", default=S, metavar="TRAIN,VALID,TEST",
                    help="fractions for a plain --data file (default 0.9,0.05,0.05)")
    hp.add_argument("--log-interval", dest="log_interval", type=_positive_int, default=S, metavar="N")
    hp.add_argument("--eval-interval", dest="eval_interval", type=_positive_int, default=S, metavar="N",
                    help="evaluate on valid and save every N steps")
    hp.add_argument("--eval-batch-size", dest="eval_batch_size", type=_positive_int, default=S, metavar="N")


def _add_inference_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default=None, choices=("reference", "torch", "triton", "cuda", "auto"),
                   help="kernel backend (default: SHARNN_FAST_BACKEND if set, else the checkpoint's where "
                   "it can run here, else auto)")


def _add_threads(p) -> None:
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads of torch's ops (default: OMP_NUM_THREADS if set, else this machine's "
                   "cores less those other programs keep busy, by the 1-minute load average; at least 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sharnn", description="Train and evaluate SHA-RNN byte-level language models "
                     "(Merity 2019) with sharnn_fast.", epilog=EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("prepare", help="split a corpus into train/valid/test byte files",
                            description="Write train.bin, valid.bin, test.bin and meta.json. enwik8 (by name "
                            "or size) gets the paper's split: first 90M bytes train, next 5M valid, last "
                            "5M test. Nothing is downloaded: enwik8.zip is at "
                            "http://mattmahoney.net/dc/enwik8.zip")
    p.add_argument("source", help="enwik8, enwik8.zip, any text file, or a folder of text files (read in "
                   "sorted path order, hidden files left out; symbolic links followed, each file read once; "
                   "meta.json lists the files read and those skipped)")
    p.add_argument("out_dir", help="output folder")
    p.add_argument("--split", default=None, metavar="TRAIN,VALID,TEST",
                   help="fractions for sources other than enwik8 (default 0.9,0.05,0.05)")

    p = commands.add_parser("train", help="train (the paper's recipe; presets tiny, paper, paper-all-attn)",
                            description="Train a SHA-RNN on bytes. Without --data: the embedded corpus (the "
                            "Python standard library's docstrings, built offline). Flags given override "
                            "the preset, or the checkpoint with --resume.")
    _add_train_arguments(p)

    p = commands.add_parser("eval", help="bits per byte of a checkpoint on a split",
                            description="Bits per byte (bpc) of a checkpoint on a split, carrying the hidden "
                            "state and the attention memory across the whole split as the published "
                            "evaluation does. The split is cut into --batch-size columns; as in the "
                            "published batchify, the last (length mod batch size) bytes are left out, so "
                            "--batch-size 1 scores every byte (and gives each the longest context). "
                            "--dynamic adds dynamic evaluation (below).")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a .pt file written by sharnn train")
    p.add_argument("--data", default=None, help="default: the data the checkpoint was trained on")
    p.add_argument("--split", default="valid", choices=("valid", "test", "train"), help="default valid")
    p.add_argument("--batch-size", type=_positive_int, default=10,
                   help="columns, of all processes together under torchrun, so that any number of "
                   "processes scores the same bytes (default 10; 1 scores every byte, with the longest context)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    _add_threads(p)
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                   help="autocast dtype (default: fp16 on a GPU, fp32 on a CPU)")
    _add_inference_backend(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (split, bpc, loss, tokens, "
                   "tokens_per_s, ...; with --dynamic also \"dynamic\": its bpc, tokens_per_s and settings)")
    dyn = p.add_argument_group(
        "dynamic evaluation (Krause et al. 2018, \"Dynamic Evaluation of Neural Sequence Models\", section 4)",
        "After the static pass, the split is read again in segments of --dynamic-bptt bytes: each is scored "
        "with the weights as they are, then one gradient step on it adapts them, so the model only learns "
        "from text it has already scored. rms: theta -= lr * g / (sqrt(MS) + 0.1 mean(sqrt(MS))), MS the "
        "mean squared gradient over --dynamic-stats-segments segments of the train split; sgd: theta -= "
        "lr * g; both then pull back towards the trained weights by --dynamic-decay (rms: scaled per weight "
        "by sqrt(MS) over its mean, never past the trained weights). Dropout is off. The checkpoint is only "
        "read. fp16 scales the loss (a GradScaler); under torchrun the gradients are summed over the "
        "processes. Formulas and measured gains: README.md, \"Dynamic evaluation\".")
    dyn.add_argument("--dynamic", action="store_true", help="also evaluate dynamically; print both bpc")
    dyn.add_argument("--dynamic-method", choices=("rms", "sgd"), default=None,
                     help="update rule (default rms, the paper's)")
    dyn.add_argument("--dynamic-lr", type=_learning_rate, default=None, metavar="ETA",
                     help="step size eta > 0 (default 5e-4 for rms, 0.1 for sgd: chosen on the tiny preset's "
                     "valid split)")
    dyn.add_argument("--dynamic-decay", type=_unit_interval, default=None, metavar="LAMBDA",
                     help="pull towards the trained weights per step, in [0, 1] (default 0.02, the published "
                     "setting)")
    dyn.add_argument("--dynamic-bptt", type=_positive_int, default=None, metavar="N",
                     help="segment length in bytes, one update per segment (default: 128, or the "
                     "checkpoint's bptt if smaller)")
    dyn.add_argument("--dynamic-stats-segments", type=_positive_int, default=None, metavar="K",
                     help="train-split segments the rms statistics average over (default 100)")

    from .generation import COMPILE_MIN_TOKENS

    p = commands.add_parser("generate", help="continue a prompt with a checkpoint, streaming the text",
                            description="Continue a prompt with a checkpoint from `sharnn train`, writing "
                            "the new bytes to stdout as they come (decoded as UTF-8, invalid bytes "
                            "replaced). Sampling: temperature, then top-k, then top-p (nucleus); "
                            "--greedy takes the most likely byte instead.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="the prompt, encoded as UTF-8")
    prompt.add_argument("--prompt-file", metavar="FILE", help="a file whose bytes are the prompt")
    p.add_argument("--max-new-tokens", type=_non_negative_int, default=200, metavar="N",
                   help="bytes to generate (default 200)")
    p.add_argument("--temperature", type=_positive_float, default=None, metavar="T",
                   help="divides the logits before sampling, > 0 (default 1.0; a tiny one tends to --greedy)")
    p.add_argument("--top-k", type=_positive_int, default=None, metavar="K", help="keep the K most likely bytes")
    p.add_argument("--top-p", type=_probability, default=None, metavar="P",
                   help="nucleus sampling: keep the most likely bytes until their probability reaches P, in (0, 1]")
    p.add_argument("--greedy", action="store_true",
                   help="always the most likely byte (no sampling; not with --temperature/--top-k/--top-p/--seed)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    _add_threads(p)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="bf16/fp16: autocast (default fp32)")
    _add_inference_backend(p)
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="run the one-byte decode step through torch.compile, which fuses its few dozen small "
                   "ops. Compiling takes 10 to 40 s on a CPU, paid once per process, model and batch size before "
                   "the first new byte, and is printed to stderr; it then saves about a quarter of each byte's time on a CPU, so it pays "
                   "off only for long outputs. auto (default): compile on a CPU when --max-new-tokens is at least "
                   f"{COMPILE_MIN_TOKENS}, and fall back to the uncompiled step with a warning if compiling "
                   "fails; on: always (also on CUDA, where the CUDA graph replays the compiled step; a failed "
                   "compile is an error); off: never")

    p = commands.add_parser("plot", help="draw the bpc curves of a run (needs matplotlib: the plot extra)",
                            description="Draw bits per byte against step for the train, valid and test "
                            "events of a run's metrics.jsonl (written by `sharnn train` in its --save folder) "
                            "into a PNG image, RUN_DIR/curves.png unless --out says otherwise; the format "
                            "follows --out's extension (png, pdf, svg, ...). Needs matplotlib: pip install "
                            "matplotlib (or, in a checkout of sharnn_fast, pip install '.[plot]').")
    p.add_argument("run_dir", help="a --save folder holding metrics.jsonl")
    p.add_argument("--out", default=None, metavar="IMAGE", help="image path (default RUN_DIR/curves.png)")
    return parser


def _train(args) -> int:
    from .training import train
    from .training.distributed import set_cpu_threads
    from .training.config import parse_attn_layers
    from .training.data import parse_split

    set_cpu_threads(args.threads)
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("command", "preset", "save", "resume", "overwrite", "threads")}
    if "attn_layers" in overrides:
        overrides["attn_layers"] = parse_attn_layers(overrides["attn_layers"])
    if "split" in overrides:
        overrides["split"] = parse_split(overrides["split"])
    if "when" in overrides:
        overrides["when"] = tuple(overrides["when"])
    if "data" in overrides:
        overrides["data"] = str(Path(overrides["data"]).resolve())
    summary = train(args.preset, overrides, save_dir=args.save, resume_path=args.resume,
                    overwrite=args.overwrite)
    return summary["exit_code"]


def _prepare(args) -> int:
    from .training.data import parse_split, prepare

    meta = prepare(args.source, args.out_dir, parse_split(args.split) if args.split else None)
    print(f"read {len(meta['files'])} file{'s' if len(meta['files']) != 1 else ''}, {meta['source_bytes']:,} bytes")
    for skipped in meta["skipped"]:
        print(f"skipped {skipped['path']}: {skipped['reason']}")
    for name, entry in meta["splits"].items():
        print(f"{name:5s} {entry['bytes']:>12,} bytes  {Path(args.out_dir) / entry['file']}  sha256 {entry['sha256'][:16]}...")
    print(f"split: {meta['split_rule']}\nwrote {Path(args.out_dir) / 'meta.json'}")
    return 0


def _eval(args) -> int:
    from .training.dynamic import DynamicEval
    from .training.distributed import set_cpu_threads
    from .training.errors import UserInputError
    from .training.loop import evaluate_checkpoint
    from .training.report import strict_json

    settings = dict(method=args.dynamic_method, lr=args.dynamic_lr, decay=args.dynamic_decay, bptt=args.dynamic_bptt,
                    stats_segments=args.dynamic_stats_segments)
    given = [f"--dynamic-{name.replace('_', '-')}" for name, value in settings.items() if value is not None]
    if given and not args.dynamic:
        raise UserInputError(f"{', '.join(given)} only {'applies' if len(given) == 1 else 'apply'} to dynamic "
                             f"evaluation: add --dynamic")
    set_cpu_threads(args.threads)
    dynamic = DynamicEval(**{k: v for k, v in settings.items() if v is not None}) if args.dynamic else None
    result = evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split, batch_size=args.batch_size,
                                 device=args.device, precision=args.precision, backend=args.backend,
                                 dynamic=dynamic, progress=not args.json)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun every rank holds the same result; rank 0 prints it
    if args.json:
        print(strict_json(result))
        return 0
    print(f"{result['split']}: {result['bpc']:.4f} bpc ({result['loss']:.4f} nats per byte) over "
          f"{result['tokens']:,} bytes at {result['tokens_per_s']:,.0f} tokens/s; {result['checkpoint']} "
          f"(step {result['step']:,}); {result['data']}")
    d = result.get("dynamic")
    if d is not None:
        stats = (f", statistics over {d['stats_segments']} train segments ({d['stats_seconds']:.1f} s)"
                 if d["method"] == "rms" else "")
        skipped = f", {d['skipped_updates']} fp16 updates skipped (overflow)" if d["skipped_updates"] else ""
        print(f"{result['split']}: {d['bpc']:.4f} bpc dynamic ({d['bpc'] - result['bpc']:+.4f} against static) at "
              f"{d['tokens_per_s']:,.0f} tokens/s; {d['method']}, lr {d['lr']:g}, decay {d['decay']:g}, "
              f"segments of {d['bptt']} bytes ({d['updates']:,} updates{skipped}){stats}")
    return 0


def _generate(args) -> int:
    from .cli_generate import generate_text
    from .generation import CompileError
    from .training.distributed import set_cpu_threads
    from .training.errors import UserInputError

    sampling = [flag for flag, value in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                         ("--top-p", args.top_p), ("--seed", args.seed)) if value is not None]
    if args.greedy and sampling:
        raise UserInputError(f"--greedy takes the most likely byte every time; {', '.join(sampling)} "
                             "would have no effect: drop one or the other")
    set_cpu_threads(args.threads)
    if args.prompt is not None:
        prompt = _prompt_bytes(args.prompt)
    else:
        try:
            prompt = Path(args.prompt_file).read_bytes()
        except OSError as err:
            raise UserInputError(f"--prompt-file: cannot read {args.prompt_file}: {err.strerror}") from None
    try:
        generate_text(args.checkpoint, prompt, sys.stdout, max_new_tokens=args.max_new_tokens,
                      do_sample=not args.greedy, temperature=args.temperature or 1.0, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed, device=args.device, precision=args.precision,
                      backend=args.backend, compile={"auto": None, "on": True, "off": False}[args.compile])
    except (ValueError, TypeError, CompileError) as err:  # argument checks, --compile on that cannot: not a bug
        raise UserInputError(str(err)) from None
    print()
    return 0


def _prompt_bytes(text: str) -> bytes:
    """The bytes of --prompt as the user typed them. On POSIX the command line is bytes, which
    Python decodes with surrogate escapes for what is not valid in the locale's encoding (e.g. a
    lone 0xff): os.fsencode gives those bytes back, as --prompt-file would read them. Elsewhere
    the command line is text: UTF-8."""
    from .training.errors import UserInputError

    try:
        return os.fsencode(text) if os.name == "posix" else text.encode("utf-8")
    except UnicodeError as err:
        raise UserInputError(f"--prompt: cannot encode it as bytes ({err.reason}); put the bytes in a "
                             f"file and pass --prompt-file") from None


def _plot(args) -> int:
    from .training.report import plot_metrics

    print(f"wrote {plot_metrics(args.run_dir, args.out)}")
    return 0


COMMANDS = {"prepare": _prepare, "train": _train, "eval": _eval, "generate": _generate, "plot": _plot}


def main(argv=None) -> int:
    """Entry point of the ``sharnn`` console script; returns the exit status.

    Signals are handled from the first line: while the parser and torch load, SIGINT and SIGTERM
    are held (a KeyboardInterrupt inside torch's import can abort the process) and acted on as soon
    as that is done; from then on they interrupt the command, which says so in one line and exits
    with 128 + the signal (130 for Ctrl-C, 143 for SIGTERM). `sharnn train` catches them itself
    while it trains: it saves and stops after the step (README, Training)."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread has signals
        return _main(argv, None)
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _main(argv, held)
    finally:  # as they were (main may run inside another program, a test say)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv, held: Optional[list]) -> int:
    prog = "sharnn"
    try:
        args = build_parser().parse_args(argv)
        prog = f"sharnn {args.command}"
        from .backend import BackendUnavailableError
        from ._files import WriteError
        from .training.errors import Interrupted, StorageError, UserInputError
        from .training.loop import TrainingDiverged
    finally:
        if held is not None:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, _interrupt)
    if held:
        return _interrupted(prog, held[0], "before it started")

    try:
        _check_environment()
        return COMMANDS[args.command](args)
    except (UserInputError, BackendUnavailableError) as err:
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (TrainingDiverged, StorageError, WriteError) as err:
        print(f"{prog}: {_one_line(err)}", file=sys.stderr)
        return 1
    except Interrupted as err:
        return _interrupted(prog, err.signum, err.detail)
    except KeyboardInterrupt:
        return _interrupted(prog, signal.SIGINT, "")
    except BrokenPipeError:  # stdout's reader stopped reading (`sharnn generate ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 128 + 13  # as if killed by SIGPIPE, what a shell reports for `cat file | head`
    except Exception as err:  # a bug: still one line, the traceback on request
        if os.environ.get("SHARNN_DEBUG"):
            raise
        print(f"{prog}: internal error: {type(err).__name__}: {_one_line(err)} (set SHARNN_DEBUG=1 for "
              f"the traceback, and please report it)", file=sys.stderr)
        return 1


def _check_environment() -> None:
    """Every SHARNN_FAST_* switch (and torchrun's variables) checked before anything starts: a bad
    value is bad input, named in one line, not an error found in the middle of a run."""
    from . import _env
    from .backend import get_backend
    from .training.errors import UserInputError

    try:
        _env.check()
        get_backend()  # checks SHARNN_FAST_BACKEND
    except ValueError as err:
        raise UserInputError(str(err)) from None


def _interrupt(signum, frame):
    from .training.errors import Interrupted
    raise Interrupted(signum)


def _interrupted(prog: str, signum: int, detail: str) -> int:
    name = signal.Signals(signum).name
    print(f"{prog}: interrupted by {name}" + (f" {detail}" if detail.startswith("before") else
                                               f": {detail}" if detail else ""), file=sys.stderr)
    return 128 + int(signum)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__
