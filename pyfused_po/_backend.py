"""Choosing between the Triton kernels and the chunked PyTorch backend."""
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to run kernels on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(backend: str, tensor: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for ``backend`` and the device of ``tensor``.

    ``auto`` picks Triton for CUDA tensors and whenever ``TRITON_INTERPRET=1``,
    the PyTorch backend otherwise.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if (tensor.is_cuda or interpreting()) else "torch"
    if backend == "triton" and not (tensor.is_cuda or interpreting()):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got device {tensor.device}); "
            "set TRITON_INTERPRET=1 to run the kernels on the CPU, or use backend='torch'"
        )
    return backend


def triton_kernels():
    """``pyfused_po.kernels`` (importing Triton), with an error that names what is really missing.

    Triton itself may be absent (macOS, Windows), or present but unable to run: its CPU
    interpreter (``TRITON_INTERPRET=1``) imports numpy, which Triton does not declare.
    """
    try:
        from . import kernels
    except ImportError as err:
        missing = getattr(err, "name", None) or "triton"
        raise ImportError(
            f"backend='triton' could not import {missing!r} ({err}); "
            f"pip install {missing.split('.')[0]}, or use backend='torch' without Triton"
        ) from err
    return kernels


def token_ops(name: str):
    """The module providing ``token_forward`` / ``token_backward`` for a resolved backend."""
    if name == "triton":
        return triton_kernels()
    from .token import torch_backend

    return torch_backend
