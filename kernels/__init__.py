"""Triton kernels of pyfused_po (installed as ``pyfused_po.kernels``).

Only ``@triton.jit`` kernels and their launchers live here: no autograd and no
loss semantics.  Importing this package imports Triton.
"""
from .token_launch import EXTRA_NAMES, launch_config, token_backward, token_forward

__all__ = ["EXTRA_NAMES", "launch_config", "token_backward", "token_forward"]
