"""Autocast for the fused-linear stage: the head GEMMs run in autocast's dtype, gradients
keep the parameters' precision.

Under ``torch.autocast`` a plain ``F.linear(hidden, weight)`` casts both operands to the
autocast dtype (bf16/fp16) and returns bf16/fp16 logits; its ``weight`` gradient comes
out of a bf16 GEMM and is rounded to bf16 before it reaches the fp32 parameter.  The
fused-linear stage takes the same decision for its GEMMs and nothing else:

* when autocast is on for the inputs' device and ``hidden``, ``weight`` (and ``bias``)
  are float16/bfloat16/float32 — mixed dtypes allowed, as ``F.linear`` allows them — the
  operands are cast to the autocast dtype;
* the kernels then run with autocast **off**, so forward and backward use the same
  operand dtype even though autograd runs the backward outside the autocast region;
* ``grad_weight`` / ``grad_bias`` stay in their fp32 accumulators until they are returned
  in the parameters' own dtype (no bf16 rounding of an fp32 master weight's gradient);
  ``grad_hidden`` is returned in ``hidden``'s dtype.

The casts are taken again in the backward (a ``[V, D]`` copy) instead of saving the cast
weight across the step, as the memory is worth more than one cast.
"""
import contextlib

import torch

_CASTABLE = (torch.float16, torch.bfloat16, torch.float32)


def head_matmul_dtype(hidden, weight, bias=None):
    """The dtype autocast would run ``hidden @ weight.T`` in, or ``None`` when autocast is off
    for ``hidden``'s device or an operand is not float16/bfloat16/float32 (e.g. float64)."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    if any(t is not None and t.dtype not in _CASTABLE for t in (hidden, weight, bias)):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_operands(mm_dtype, hidden, weight, bias):
    """``(hidden, weight, bias)`` in ``mm_dtype`` (unchanged when it is ``None``)."""
    if mm_dtype is None:
        return hidden, weight, bias
    return hidden.to(mm_dtype), weight.to(mm_dtype), None if bias is None else bias.to(mm_dtype)


def autocast_off(device_type):
    """A context in which the stage's own GEMMs are not re-cast by an enclosing autocast."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
