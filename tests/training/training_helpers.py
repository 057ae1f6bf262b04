"""Helpers of the training tests: very small model settings and a
runner for the ``sharnn`` command in a subprocess (``python -m sharnn_fast``, what the console
script calls)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A model small enough that a CLI run is dominated by Python's start-up: every flag is explicit.
SMALL = ["--emsize", "16", "--nhid", "32", "--nlayers", "2", "--bptt", "16", "--batch_size", "4",
         "--eval-batch-size", "2", "--eval-interval", "4", "--log-interval", "1", "--warmup", "3",
         "--dropout", "0", "--dropouth", "0", "--dropouti", "0"]
SMALL_CONFIG = dict(emsize=16, nhid=32, nlayers=2, bptt=16, batch_size=4, eval_batch_size=2, eval_interval=4,
                    log_interval=1, warmup=3, dropout=0.0, dropouth=0.0, dropouti=0.0)


def sharnn_env(**extra) -> dict:
    # One thread: tiny models gain nothing from more, and a busy 2-core machine loses a lot.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env.pop("SHARNN_DEBUG", None)
    return env


def run_sharnn(*args, timeout=120, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sharnn_fast", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env or sharnn_env(), cwd=cwd or ROOT)


def assert_one_line_error(result, *fragments, status=2):
    """Exit status, exactly one line on stderr holding every fragment, and no traceback."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def rewrite_checkpoint(source, target, edit):
    """Save a copy of the checkpoint ``source`` at ``target`` after ``edit(payload)`` changed it
    in place, as sharnn_fast would have written it."""
    import torch

    from sharnn_fast.training.checkpoint import save_checkpoint

    payload = torch.load(source, weights_only=True)
    edit(payload)
    save_checkpoint(target, {k: v for k, v in payload.items() if k not in ("format", "version", "checksum")})
