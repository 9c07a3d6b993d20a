"""Value checks that must also run inside a ``torch.compile``-d graph.

Reading a tensor's values back to Python (``bool((x < 0).any())``) breaks a compiled graph,
so eager code skips such checks while Dynamo traces.  Wrapped in an opaque custom op, the
check runs on the real tensors when the compiled graph executes; the op returns a copy of
its input that the caller uses in place of the input, so the compiler cannot drop it.
"""
import torch
from torch import Tensor

from .validation import debug_checks_enabled


@torch.library.custom_op("pyfused_po::check_nonnegative", mutates_args=())
def check_nonnegative(x: Tensor, name: str) -> Tensor:
    """``x`` (a copy) after checking ``x >= 0`` (CPU tensors; CUDA with ``PYFUSED_PO_DEBUG=1``)."""
    if (not x.is_cuda or debug_checks_enabled()) and x.numel() and bool((x < 0).any()):
        raise ValueError(f"{name} must be >= 0, got {x.min().item()}")
    return x.clone()


@check_nonnegative.register_fake
def _(x, name):
    return torch.empty_like(x)


def nonnegative(x, name):
    """``x`` checked to be ≥ 0, eagerly or inside a compiled graph (no gradient flows: lengths)."""
    if torch.compiler.is_compiling():
        return check_nonnegative(x.detach(), name)
    if not x.is_cuda or debug_checks_enabled():
        if x.numel() and bool((x < 0).any()):
            raise ValueError(f"{name} must be >= 0, got {x.min().item()}")
    return x


@torch.library.custom_op("pyfused_po::check_labels_agree", mutates_args=())
def check_labels_agree(labels: Tensor, extra_labels: Tensor, ignore_index: int, name: str) -> Tensor:
    """``labels`` (a copy) after checking that ``extra_labels`` equals it wherever both are set
    (:func:`pyfused_po.sequence.sums.merge_labels`; CPU tensors, CUDA with ``PYFUSED_PO_DEBUG=1``)."""
    if not labels.is_cuda or debug_checks_enabled():
        both = (labels != ignore_index) & (extra_labels != ignore_index)
        if bool((both & (labels != extra_labels)).any()):
            raise ValueError(f"{name} must equal labels wherever both are not ignore_index={ignore_index}")
    return labels.clone()


@check_labels_agree.register_fake
def _(labels, extra_labels, ignore_index, name):
    return torch.empty_like(labels)
