"""sharnn_fast: fast kernels and a drop-in model for SHA-RNN (Merity 2019).

Public API: :class:`SHARNN`, :mod:`ops` (lstm, attention, boom), :func:`set_backend`,
:func:`get_backend`, :func:`explain` and :func:`build_info`.
"""
from . import ops
from ._native import build_info
from .backend import BackendUnavailableError, explain, get_backend, set_backend
from .model import SHARNN

__version__ = "0.1.0"

__all__ = ["SHARNN", "ops", "set_backend", "get_backend", "explain", "build_info",
           "BackendUnavailableError", "__version__"]
