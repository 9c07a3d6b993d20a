"""Launchers of ``truncated_select.py``: a tile of raw logits rows ``[C, V]`` in, fp32 out, no autograd.

The contract is :func:`pyfused_po.token.truncated_support.fold_forward` / ``fold_backward``'s (the PyTorch
fold), so ``pyfused_po.token.truncated_logprobs`` runs either on the same tiles.
"""
import os

import torch
import triton

from .truncated_select import truncated_backward_kernel, truncated_forward_kernel


def _block(V):
    """Elements per block: the radix passes hold a ``[BLOCK, 16]`` bucket compare in registers,
    so 1024 on a GPU (16 per thread at 8 warps); 64 under the interpreter (several blocks per row
    in the CPU tests)."""
    cap = 64 if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else 1024
    return min(cap, triton.next_power_of_2(max(V, 1)))


def _transform_args(logit_scale, temperature, softcap):
    """``(scale, 1/T, softcap value, c = scale/T, HAS_SOFTCAP, RAW_DIFF)``: ``RAW_DIFF`` as
    :func:`pyfused_po.token.torch_backend.token.row_stats` chooses ``(x − x_max)·c`` over ``z − m``."""
    c = float(logit_scale) / float(temperature)
    has_cap = softcap is not None
    return (float(logit_scale), 1.0 / float(temperature), 0.0 if softcap is None else float(softcap), c,
            has_cap, not has_cap and c != 1.0)


def _rows(x):
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x


def fold_forward(x, targets, *, top_k, top_p, min_p, minp_first, with_entropy, logit_scale, temperature,
                 softcap):
    """``(logp [C], stats [C, 2], entropy [C] or None)`` fp32 of the rows ``x [C, V]``."""
    x = _rows(x)
    C, V = x.shape
    logp = torch.empty(C, device=x.device, dtype=torch.float32)
    stats = torch.empty(C, 2, device=x.device, dtype=torch.float32)
    entropy = torch.empty(C, device=x.device, dtype=torch.float32) if with_entropy else None
    if C == 0:
        return logp, stats, entropy
    scale, inv_temp, cap, c, has_cap, raw = _transform_args(logit_scale, temperature, softcap)
    use_k = top_k is not None and top_k < V
    use_p = top_p is not None and top_p < 1.0
    truncated_forward_kernel[(C,)](
        x, x.stride(0), targets.contiguous(), logp, stats, logp if entropy is None else entropy,
        V, int(top_k) if use_k else 0, float(top_p) if use_p else 1.0, float(min_p or 0.0),
        scale, inv_temp, cap, c,
        TOP_K=use_k, TOP_P=use_p, MIN_P=bool(min_p), MINP_FIRST=bool(min_p) and bool(minp_first),
        HAS_SOFTCAP=has_cap, RAW_DIFF=raw, WANT_ENTROPY=bool(with_entropy), BLOCK=_block(V), num_warps=8,
    )
    return logp, stats, entropy


def fold_backward(x, targets, stats, *, grad_logp=None, grad_entropy=None, entropy=None, logit_scale,
                  temperature, softcap):
    """``∂L/∂x [C, V]`` fp32 of the rows ``x`` (the forward's ``stats``; see ``truncated_select.py``)."""
    x = _rows(x)
    C, V = x.shape
    out = torch.empty(C, V, device=x.device, dtype=torch.float32)
    if C == 0:
        return out
    scale, inv_temp, cap, c, has_cap, raw = _transform_args(logit_scale, temperature, softcap)
    dummy = stats
    truncated_backward_kernel[(C,)](
        x, x.stride(0), targets.contiguous(), stats.contiguous(),
        dummy if grad_logp is None else grad_logp.float().contiguous(),
        dummy if grad_entropy is None else grad_entropy.float().contiguous(),
        dummy if entropy is None else entropy.float().contiguous(),
        out, out.stride(0), V, scale, inv_temp, cap, c,
        HAS_G=grad_logp is not None, HAS_GH=grad_entropy is not None, HAS_SOFTCAP=has_cap, RAW_DIFF=raw,
        BLOCK=_block(V), num_warps=8,
    )
    return out
