"""Input checks that run before any kernel launches.

Every check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong
shape or value) with a message naming the argument, what was expected and what
was given.  None of them reads tensor *values* from a CUDA device (no host
sync), except :func:`check_label_range` when it is asked for.
"""
import math
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def debug_checks_enabled() -> bool:
    """``PYFUSED_PO_DEBUG=1`` turns on checks that would cost a host sync on CUDA."""
    return os.environ.get("PYFUSED_PO_DEBUG", "0") not in ("", "0")


def check_tensor(name, x, *, floating=None, min_dim=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating is True and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if floating is False and x.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (token ids), got {x.dtype}")
    if min_dim is not None and x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(x.shape)}")


def check_same_device(**tensors):
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {listing}")


def check_shape(name, x, expected, what):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(x.shape)}")


def check_positive(name, value, *, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_finite_nonzero(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0:
        raise ValueError(f"{name} must be a finite non-zero number, got {value!r}")


def check_label_range(labels, vocab_size, ignore_index, *, force=False):
    """Labels must lie in ``[0, vocab_size)`` or equal ``ignore_index``.

    Always checked for CPU tensors; for CUDA tensors only with ``force`` or
    ``PYFUSED_PO_DEBUG=1``, since reading the result back is a host sync.
    """
    if labels.is_cuda and not (force or debug_checks_enabled()):
        return
    if torch.compiler.is_compiling():
        return  # reading a value back would break the compiled graph; eager calls check it
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(
            f"labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"found {int(bad.sum())} out of range, e.g. {first}"
        )
