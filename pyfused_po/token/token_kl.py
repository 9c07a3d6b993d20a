"""Token stage, two models at once: per-token full-vocabulary KL(π_ref ‖ π_θ).

``token_kl`` reads the policy's and the reference's logits row in the same pass and
returns Σ_v p_ref,v (log p_ref,v − log p_θ,v) per token, with a hand-written backward
g·(softmax_θ − softmax_ref) to the policy logits; neither distribution is ever stored.
Used by EXPO's KL regularizer, and on its own for token-level distillation.
"""
from typing import NamedTuple

import torch

from .. import _backend
from .autograd_guard import first_derivative_only
from .packed_layout import run_packed
from .token_logprobs import (
    TokenConfig,
    _rows_view,
    gradient_buffer,
    logits_view,
    make_token_config,
    validate_token_inputs,
)
from ..validation import check_same_device, check_tensor, checked_labels


class TokenKL(NamedTuple):
    """Per-token results shaped like ``labels`` (0 where ignored): ``kl`` and the policy's
    log p(label) ``logps`` from the same pass."""

    kl: torch.Tensor
    logps: torch.Tensor


def _kl_ops(backend: str):
    if backend == "triton":
        _backend.token_ops("triton")  # raises a clear ImportError without triton
        from ..kernels import token_kl_launch

        return token_kl_launch
    from .torch_backend import kl

    return kl


class TokenKLFunction(torch.autograd.Function):
    """``forward(logits, ref_logits, labels, config, backend, want_logp)`` → ``(kl, logp)``
    (``logp`` is an empty tensor unless ``want_logp``).  Only ``logits`` gets a gradient:
    the reference is a constant."""

    @staticmethod
    def forward(ctx, logits, ref_logits, labels, config: TokenConfig, backend: str, want_logp: bool):
        ops = _kl_ops(backend)
        B, T = _rows_view(labels)
        x3 = logits_view(logits, B, T)
        r3 = logits_view(ref_logits, B, T)
        y2 = labels.reshape(B, T)
        kl, logp, lse, lse_r = ops.token_kl_forward(x3, r3, y2, want_logp=want_logp,
                                                    **config.kernel_kwargs())
        ctx.config, ctx.backend, ctx.rows = config, backend, (B, T)
        ctx.save_for_backward(logits, ref_logits, y2, lse, lse_r)
        ctx.set_materialize_grads(False)
        kl = kl.view(labels.shape)
        logp = logp.view(labels.shape) if want_logp else kl.new_empty(0)
        if not want_logp:
            ctx.mark_non_differentiable(logp)
        return kl, logp

    @staticmethod
    @first_derivative_only("token_kl")
    def backward(ctx, grad_kl, grad_logp):
        nothing = (None,) * 6
        if not ctx.needs_input_grad[0] or (grad_kl is None and grad_logp is None):
            return nothing
        logits, ref_logits, y2, lse, lse_r = ctx.saved_tensors
        B, T = ctx.rows

        def flat(g):  # upstream gradients as [B, T] contiguous in the compute dtype
            return None if g is None or g.numel() == 0 else g.reshape(B, T).to(lse.dtype).contiguous()

        grad_kl, grad_logp = flat(grad_kl), flat(grad_logp)
        if grad_kl is None and grad_logp is None:
            return nothing
        grad_logits = gradient_buffer(logits, B, T)
        _kl_ops(ctx.backend).token_kl_backward(
            logits_view(logits, B, T), logits_view(ref_logits, B, T), y2, lse, lse_r,
            logits_view(grad_logits, B, T, inplace=True),
            grad_kl=grad_kl, grad_logp=grad_logp, **ctx.config.kernel_kwargs(),
        )
        return (grad_logits,) + nothing[1:]


def _validate_ref(logits, ref_logits, backend):
    check_tensor("ref_logits", ref_logits, floating=True)
    if tuple(ref_logits.shape) != tuple(logits.shape):
        raise ValueError(f"ref_logits must have the shape of logits {tuple(logits.shape)}, "
                         f"got {tuple(ref_logits.shape)}")
    check_same_device(logits=logits, ref_logits=ref_logits)
    if backend == "triton" and ref_logits.dtype == torch.float64:
        raise TypeError("backend='triton' computes in float32 and takes float16/bfloat16/float32 "
                        "ref_logits, got float64; use backend='torch' for float64")


def token_kl(logits, ref_logits, labels, *, ignore_index=-100, shift=False, temperature=1.0,
             logit_scale=1.0, softcap=None, backend="auto", with_logps=False, cu_seqlens=None, position_ids=None):
    """Per-token KL(π_ref ‖ π_θ) = Σ_v p_ref,v (log p_ref,v − log p_θ,v) over the full vocabulary.

    Both distributions are softmaxes of transformed logits
    ``z = softcap(x · logit_scale) / temperature`` (the same transform for both, as in
    :func:`pyfused_po.token_logprobs`).  Tokens whose label is ``ignore_index`` give 0
    and neither row is read; with ``shift=True`` the logits at ``t`` belong to the label
    at ``t + 1`` and the result is aligned with ``labels`` (position 0 gives 0).  The
    label's value is not used otherwise (except for ``with_logps``).

    The gradient flows to ``logits`` only: ``∂KL_t/∂z_t = softmax(z_t) − softmax(zr_t)``
    (times dz/dx); ``ref_logits`` is treated as a constant even if it requires grad.
    Vocabulary entries with p_ref = 0 (−inf reference logits, e.g. a padded vocabulary)
    contribute 0; a −inf policy logit where p_ref > 0 gives +inf, the true value.

    Args:
        logits: policy ``[..., T, V]`` float16/bfloat16/float32 (float64 on the torch
            backend), any strides.
        ref_logits: reference logits of the same shape (any float dtype the backend takes,
            its own strides).
        labels: ``[..., T]`` integer token ids; ``ignore_index`` marks tokens to skip.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` as in ``token_logprobs``.
        with_logps: also return the policy's per-token log p(label) from the same pass
            (differentiable), as a :class:`TokenKL`.
        cu_seqlens, position_ids: a packed stream, as in :func:`pyfused_po.token_logprobs`.

    Returns:
        float32 per-token KL shaped like ``labels`` (float64 for float64 logits on the
        torch backend), or a :class:`TokenKL` with ``with_logps=True``.
    """
    if cu_seqlens is not None or position_ids is not None:
        return run_packed(lambda y, s: token_kl(
            logits, ref_logits, y, ignore_index=ignore_index, shift=s, temperature=temperature,
            logit_scale=logit_scale, softcap=softcap, backend=backend, with_logps=with_logps),
            labels, cu_seqlens=cu_seqlens, position_ids=position_ids, shift=shift, ignore_index=ignore_index)
    config = make_token_config(ignore_index, shift, temperature, logit_scale, softcap, ())
    labels = checked_labels("labels", labels, config.ignore_index)
    resolved = validate_token_inputs(logits, labels, config, backend)
    _validate_ref(logits, ref_logits, resolved)
    kl, logp = TokenKLFunction.apply(logits, ref_logits.detach(), labels, config, resolved,
                                     bool(with_logps))
    return TokenKL(kl, logp) if with_logps else kl
