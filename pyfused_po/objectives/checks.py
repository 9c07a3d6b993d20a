"""Range checks for hyper-parameters that may be Python numbers or per-pair tensors."""
import math

import torch

from ..validation import debug_checks_enabled


def _bounds(value):
    """(min, max) of a number or tensor, or None when reading a CUDA tensor would sync."""
    if isinstance(value, torch.Tensor):
        if value.is_cuda and not debug_checks_enabled():
            return None
        if value.numel() == 0:
            return None
        return value.min().item(), value.max().item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number or a tensor, got {type(value).__name__}")
    return value, value


def check_range(name, value, low, high, *, low_open=False, high_open=False):
    """Raise ``ValueError`` unless every entry of ``value`` lies in the interval."""
    try:
        bounds = _bounds(value)
    except TypeError:
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}") from None
    if bounds is None:
        return
    lo, hi = bounds
    ok = (math.isfinite(lo) and math.isfinite(hi)
          and (lo > low if low_open else lo >= low) and (hi < high if high_open else hi <= high))
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        shown = value if not isinstance(value, torch.Tensor) else f"values in [{lo}, {hi}]"
        raise ValueError(f"{name} must be in {interval}, got {shown}")


def check_number(name, value, *, positive=False, nonzero=False):
    """A finite Python number (optionally > 0 or ≠ 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if nonzero and value == 0:
        raise ValueError(f"{name} must be non-zero, got {value!r}")
