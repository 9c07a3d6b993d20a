"""Launchers for the full-vocabulary KL kernels: shapes in, tensors out, no autograd.

Both take ``[B, T, V]`` policy and reference logits views (any strides, each its own)
and ``[B, T]`` integer labels; per-token outputs are ``[B, T]`` fp32 aligned with the
labels, ``lse`` / ``lse_r`` are per logits row: ``[B, T, 2]`` pairs ``(hi, lo)``
(``kernels/lse_pair.py``).
"""
import torch

from .token_kl_backward import token_kl_backward_kernel
from .token_kl_forward import token_kl_forward_kernel
from .token_launch import _check_pairs, flip_key, launch_config, row_layout


def _softcap_args(softcap):
    return (0.0 if softcap is None else float(softcap)), softcap is not None


def token_kl_forward(logits, ref_logits, labels, *, ignore_index, shift, temperature, logit_scale,
                     softcap, want_logp=False, block_v=None):
    """Returns ``(kl, logp or None, lse, lse_r)``."""
    B, T, V = logits.shape
    dev = logits.device
    kl = torch.zeros(B, T, device=dev, dtype=torch.float32)
    logp = torch.zeros(B, T, device=dev, dtype=torch.float32) if want_logp else None
    lse = torch.empty(B, T, 2, device=dev, dtype=torch.float32)
    lse_r = torch.empty(B, T, 2, device=dev, dtype=torch.float32)
    if B * T == 0:
        return kl, logp, lse, lse_r
    cap, has_cap = _softcap_args(softcap)
    block, warps = launch_config(V, block_v)
    token_kl_forward_kernel[(B * T,)](
        logits, *logits.stride(),
        ref_logits, *ref_logits.stride(),
        labels, *labels.stride(),
        kl, kl if logp is None else logp, lse, lse_r,
        T, V, ignore_index,
        float(logit_scale), 1.0 / float(temperature), cap,
        SHIFT=int(shift), HAS_SOFTCAP=has_cap, WANT_LOGP=bool(want_logp),
        BLOCK_V=block, num_warps=warps, **row_layout(block, logits, ref_logits),
        FLIP=flip_key(logit_scale, temperature, softcap),
    )
    return kl, logp, lse, lse_r


def token_kl_backward(logits, ref_logits, labels, lse, lse_r, grad_out, *, ignore_index, shift,
                      temperature, logit_scale, softcap, grad_kl=None, grad_logp=None,
                      block_v=None):
    """Writes ∂loss/∂logits (policy only) into ``grad_out`` (``[B, T, V]``, may alias ``logits``)."""
    B, T, V = logits.shape
    if B * T == 0:
        return grad_out
    _check_pairs("lse", lse, B, T)
    _check_pairs("lse_r", lse_r, B, T)
    cap, has_cap = _softcap_args(softcap)
    block, warps = launch_config(V, block_v)
    token_kl_backward_kernel[(B * T,)](
        logits, *logits.stride(),
        ref_logits, *ref_logits.stride(),
        grad_out, *grad_out.stride(),
        labels, *labels.stride(),
        lse, lse_r,
        lse if grad_kl is None else grad_kl,
        lse if grad_logp is None else grad_logp,
        T, V, ignore_index,
        float(logit_scale), 1.0 / float(temperature), cap,
        SHIFT=int(shift), HAS_SOFTCAP=has_cap,
        HAS_G_KL=grad_kl is not None, HAS_G_LOGP=grad_logp is not None,
        BLOCK_V=block, num_warps=warps, **row_layout(block, logits, ref_logits, grad_out),
    )
    return grad_out
