"""The run-time switches read from environment variables: one reader that checks a value, and
:func:`check`, which checks them all at once (``sharnn`` calls it before it starts anything, so
a bad value is one line and exit status 2, not an error deep inside a run).

SHARNN_FAST_BACKEND (a backend name) is read and checked by :func:`sharnn_fast.backend.get_backend`
(``sharnn`` calls both; this module imports nothing of the package, so everything may import it);
SHARNN_FAST_CACHE and SHARNN_FAST_CACHE_DIR are folders, checked when they are written.
"""
from __future__ import annotations

import os

# variable -> (accepted values, the value when unset or empty)
CHOICES = {
    "SHARNN_FAST_AUTOTUNE": (("0", "1"), "0"),
    "SHARNN_TRITON_LSTM_GRAPHS": (("auto", "0", "1"), "auto"),
    "SHARNN_GENERATE_CUDA_GRAPHS": (("auto", "0", "1"), "auto"),
}
# Set by torchrun; checked here so that a stray value is named rather than met by int().
INTEGERS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def choice(name: str) -> str:
    """The value of switch ``name`` (a key of :data:`CHOICES`), stripped, or its default when
    unset or empty. Raises ValueError naming the variable and the accepted values otherwise."""
    accepted, default = CHOICES[name]
    value = os.environ.get(name, "").strip() or default
    if value not in accepted:
        raise ValueError(f"environment variable {name} must be {_or(accepted)}, got {value!r}")
    return value


def integer(name: str, default: int) -> int:
    """The integer in variable ``name`` (a key of :data:`INTEGERS`), else ``default``. Raises
    ValueError naming the variable for anything but a non-negative integer."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit():
        raise ValueError(f"environment variable {name} must be a non-negative integer (torchrun sets it), "
                         f"got {text!r}")
    return int(text)


def check() -> None:
    """Raise ValueError for the first environment variable of sharnn_fast (or torchrun's) whose
    value cannot work: every switch of :data:`CHOICES` and :data:`INTEGERS`."""
    for name in CHOICES:
        choice(name)
    for name in INTEGERS:
        integer(name, 0)


def _or(values) -> str:
    return ", ".join(values[:-1]) + " or " + values[-1]
