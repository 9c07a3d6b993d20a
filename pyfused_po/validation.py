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


def check_per_token(labels, *, floating=True, **inputs):
    """Per-token inputs (token values, weights, reference log-probs, masks; ``None`` = absent): each
    a tensor of exactly ``labels``' shape on ``labels``' device.  Exactly, not broadcastable:
    ``[1, T]`` values with ``[4, T]`` labels would broadcast into four copies of the first row's
    values, and ``[4, 1]`` weights into one weight per row, both silently wrong.
    ``floating=None`` accepts any dtype (a boolean or integer mask)."""
    for name, x in inputs.items():
        if x is None:
            continue
        check_tensor(name, x, floating=floating)
        if tuple(x.shape) != tuple(labels.shape):
            raise ValueError(f"{name} must have the shape of labels {tuple(labels.shape)} (one value per "
                             f"token), got {tuple(x.shape)}")
        check_same_device(**{name: x, "labels": labels})


def check_exclusive(what, **candidates):
    """At most one of ``candidates`` (name → value, ``None`` = not given) may be given: two
    sources of one input (two references, two KL estimates, two packed layouts) must never
    resolve silently to one of them.  Raises ``ValueError`` naming every one given."""
    given = [name for name, value in candidates.items() if value is not None]
    if len(given) > 1:
        raise ValueError(f"pass one {what}, not {'both' if len(given) == 2 else 'several'}: "
                         f"got {' and '.join(given)}")


def check_flag(name, value):
    """``value`` as a bool: ``True`` / ``False`` (or a NumPy bool); anything else is a ``TypeError``
    (a string such as ``"false"`` would otherwise read as on)."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


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


# Label dtypes the kernels and comparisons use as they are; smaller ones are widened first.
_WIDE_LABEL_DTYPES = (torch.int32, torch.int64)


def checked_labels(name, labels, ignore_index):
    """``labels`` checked and widened so that every comparison sees their true values.

    A comparison of a small integer tensor with a Python int casts the int to the tensor's
    dtype (uint8(−100) = 156, int8(200) = −56), and the kernels load masked labels as
    ``ignore_index`` in the labels' own dtype.  So: ``ignore_index`` must be representable
    in the labels' dtype (uint8 labels cannot hold −100: ``TypeError``), and int8/int16/uint8
    labels are widened to int64 (an O(tokens) copy) before any check or kernel.
    """
    check_tensor(name, labels, floating=False)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    info = torch.iinfo(labels.dtype)
    if not info.min <= ignore_index <= info.max:
        raise TypeError(
            f"{name} of dtype {labels.dtype} (values in [{info.min}, {info.max}]) cannot hold "
            f"ignore_index={ignore_index}; pass int64 {name}, or an ignore_index inside that range"
        )
    if labels.dtype in _WIDE_LABEL_DTYPES:
        return labels
    return labels.to(torch.int64)


def as_number(name, value, *, keep_tensors=False):
    """A hyper-parameter given as a Python number, a NumPy scalar or a 0-d tensor → a Python
    number (anything else is returned as it is, for the caller's check to reject; tensors
    too with ``keep_tensors``).  ``name`` is for the caller's messages.

    A CUDA tensor costs one host sync here; hyper-parameters are read once per call.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, torch.Tensor):
        if keep_tensors:  # a hyper-parameter that may be a per-pair tensor stays one
            return value
        if value.numel() == 1 and value.dim() == 0 and (value.is_floating_point() or value.dtype in INT_DTYPES):
            return value.item()
        return value
    item = getattr(value, "item", None)
    # NumPy scalars and 0-d arrays (numpy is never imported here: duck-typed on .item/.dtype).
    if callable(item) and hasattr(value, "dtype") and getattr(value, "ndim", None) == 0:
        out = item()
        if isinstance(out, (int, float)) and not isinstance(out, bool):
            return out
    return value


def _may_overlap(x):
    """True unless the strides prove that no two elements of ``x`` share memory: ordered
    by stride, each dimension must step past the whole extent of the ones below it."""
    dims = sorted((s, n) for s, n in zip(x.stride(), x.shape) if n > 1)
    extent = 1
    for stride, size in dims:
        if stride < extent:
            return True
        extent = stride * size
    return False


def check_inplace_target(name, x):
    """``inplace_backward=True`` writes the gradient into ``x``'s own memory; refuse where
    that would be wrong or destroy something: elements sharing memory (expanded, stride 0,
    or overlapping views: their gradients would overwrite each other), and a leaf that
    requires grad, or a view of one (its values would be overwritten by its own gradient)."""
    if not x.requires_grad:
        return
    if _may_overlap(x):
        raise ValueError(
            f"inplace_backward=True needs {name} whose elements do not share memory; got shape "
            f"{tuple(x.shape)} with strides {x.stride()} (expanded or overlapping). Pass "
            f"inplace_backward=False (or a contiguous copy)."
        )
    base = x._base
    if x.is_leaf or (base is not None and base.is_leaf and base.requires_grad):
        what = "is a leaf tensor" if x.is_leaf else "is a view of a leaf tensor"
        raise ValueError(
            f"inplace_backward=True would overwrite {name}'s values with its gradient, but {name} "
            f"{what} that requires grad (its .grad would alias its overwritten data). Use it on "
            f"logits computed by the model (non-leaf), or pass inplace_backward=False."
        )
