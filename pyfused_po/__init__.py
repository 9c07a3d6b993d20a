"""pyfused_po: fused Triton kernels for preference-optimization losses (DPO and family)."""
from .token_logprobs import TokenLogprobs, token_logprobs

__version__ = "0.1.0"

__all__ = ["TokenLogprobs", "token_logprobs", "__version__"]
