"""The fused ops SHA-RNN is made of. Each dispatches through :mod:`sharnn_fast.backend`."""
from .attention import attention
from .boom import boom
from .lstm import lstm

__all__ = ["attention", "boom", "lstm"]
