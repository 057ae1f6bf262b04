"""sharnn_fast: fast kernels and a drop-in model for SHA-RNN (Merity 2019).

Public API: :class:`SHARNN`, :mod:`ops` (lstm, attention, boom), :func:`set_backend`,
:func:`get_backend`, :func:`explain`, :func:`autotune`, :func:`autotune_model`,
:func:`clear_autotune_cache`, :func:`build_info` and :func:`load_checkpoint` (a
checkpoint written by ``sharnn train`` -> (model, config)). The ``sharnn`` command is
:mod:`sharnn_fast.cli`; training lives in :mod:`sharnn_fast.training`.
"""
from . import ops
from ._native import build_info
from .autotuning import autotune, autotune_model, clear_autotune_cache
from .backend import BackendUnavailableError, explain, get_backend, set_backend
from .model import SHARNN
from .training.checkpoint import load_checkpoint

__version__ = "0.1.0"

__all__ = ["SHARNN", "ops", "set_backend", "get_backend", "explain", "build_info",
           "BackendUnavailableError", "load_checkpoint", "autotune", "autotune_model",
           "clear_autotune_cache", "__version__"]
