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


def token_ops(name: str):
    """The module providing ``token_forward`` / ``token_backward`` for a resolved backend."""
    if name == "triton":
        try:
            from . import kernels
        except ImportError as err:  # triton missing (e.g. macOS) or broken
            raise ImportError(
                "backend='triton' needs the triton package (pip install triton); "
                "use backend='torch' without it"
            ) from err
        return kernels
    from . import torch_backend

    return torch_backend
