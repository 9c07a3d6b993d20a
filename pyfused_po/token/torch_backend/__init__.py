"""Pure-PyTorch backend: bounded-memory chunked implementations of each stage's kernels."""
from .token import token_backward, token_forward

__all__ = ["token_backward", "token_forward"]
