"""sharnn_fast: fast kernels and a drop-in model for SHA-RNN (Merity 2019).

Public API: :class:`SHARNN`, :mod:`ops` (lstm, attention, boom), :func:`set_backend`,
:func:`get_backend`, :func:`explain`, :func:`autotune`, :func:`autotune_model`,
:func:`clear_autotune_cache`, :func:`build_info` and :func:`load_checkpoint` (a
checkpoint written by ``sharnn train`` -> (model, config)). The ``sharnn`` command is
:mod:`sharnn_fast.cli`; training lives in :mod:`sharnn_fast.training`.

The names are imported on first use (PEP 562), so that ``import sharnn_fast.cli`` stays light: the
``sharnn`` command installs its signal handlers before torch is imported (README, Training).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> the module that defines it (a module itself when the name is the module's).
_EXPORTS = {
    "SHARNN": ".model", "ops": ".ops", "build_info": "._native", "autotune": ".autotuning",
    "autotune_model": ".backend", "clear_autotune_cache": ".autotuning",
    "BackendUnavailableError": ".backend", "explain": ".backend", "get_backend": ".backend",
    "set_backend": ".backend", "load_checkpoint": ".training.checkpoint",
}
__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from . import ops
    from ._native import build_info
    from .autotuning import autotune, clear_autotune_cache
    from .backend import BackendUnavailableError, autotune_model, explain, get_backend, set_backend
    from .model import SHARNN
    from .training.checkpoint import load_checkpoint


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name], __name__)
    value = module if name == "ops" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
