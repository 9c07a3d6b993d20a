"""The eager PyTorch loss under ``torch.compile`` (Inductor fuses the log-softmax).

CUDA only in this suite: Inductor's CPU compile time would dwarf the CPU sizes.  One
compiled function per loss for the whole sweep, with dynamo's default automatic dynamic
shapes: the first shape compiles static, the next one recompiles with dynamic sizes and
later shapes reuse it (as in a trainer with varying lengths); compiles fall in warm-up.
"""
import torch

from .base import Method
from .torch_eager import linear_builder, linear_dpo, logits_builder, logits_dpo


_COMPILED = {}


def _compiled(make_builder, fn):
    def build(case, device):
        if fn not in _COMPILED:
            _COMPILED[fn] = torch.compile(fn)
        return make_builder(_COMPILED[fn])(case, device)
    return build


METHODS = [
    Method("torch_compile", "torch.compile", "logits", _compiled(logits_builder, logits_dpo),
           cuda_only=True),
    Method("torch_compile_linear", "torch.compile (matmul + log_softmax)", "linear",
           _compiled(linear_builder, linear_dpo), cuda_only=True),
]
