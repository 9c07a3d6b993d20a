"""The token stage as ``torch.library`` custom ops, for ``torch.compile``.

Dynamo cannot trace into Triton launches run by a Python ``autograd.Function`` (nor
into the chunked torch backend's data-dependent loops without graph breaks), so under
``torch.compile`` :func:`pyfused_po.token_logprobs` calls these opaque ops instead:

* ``pyfused_po::token_forward(logits, labels, …) -> [logp, lse, *extras]`` and
* ``pyfused_po::token_backward(logits, labels, lse, entropy?, log_sum_sq_probs?, grads…) -> grad_logits``,

each with a fake (meta) implementation giving output shapes and dtypes, and the pair
joined by ``register_autograd`` so the hand-written backward runs in the compiled graph.
Eager calls keep using :class:`~pyfused_po.token.token_logprobs.TokenLogprobsFunction`
(same kernels, same results); the in-place backward is an eager-only option (a compiled
graph gets a fresh gradient buffer).
"""
from typing import List, Optional

import torch
from torch import Tensor

from .. import _backend, _dispatch
from ..validation import check_label_range

_SAVED = ("entropy", "log_sum_sq_probs")


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _kernel_kwargs(ignore_index, shift, temperature, logit_scale, softcap):
    return dict(ignore_index=ignore_index, shift=shift, temperature=temperature, logit_scale=logit_scale,
                softcap=softcap, block_v=None)


def _names(extras):
    return [n for n in extras.split(",") if n]


def _rows(labels):
    T = labels.shape[-1]
    return labels.numel() // T if T else 0, T


@torch.library.custom_op("pyfused_po::token_forward", mutates_args=())
def token_forward(logits: Tensor, labels: Tensor, ignore_index: int, shift: bool, temperature: float,
                  logit_scale: float, softcap: Optional[float], extras: str, backend: str) -> List[Tensor]:
    """``[logp, lse, *extras]``, each shaped like ``labels`` (compute dtype; ``lse`` is
    ``labels.shape + (2,)``: the LSE pairs of the token-stage contract); ``extras`` is the
    comma-joined extras names (the op schema has no list of strings)."""
    extras = _names(extras)
    # The value checks eager calls make before the kernel, made here too: under torch.compile
    # this body runs on real tensors (the graph sees only the fake implementation).
    check_label_range(labels, logits.shape[-1], ignore_index)
    B, T = _rows(labels)
    x3 = logits.reshape(B, T, logits.shape[-1])
    logp, lse, outs = _backend.token_ops(backend).token_forward(
        x3, labels.reshape(B, T), extras=tuple(extras),
        **_kernel_kwargs(ignore_index, shift, temperature, logit_scale, softcap))
    # Custom ops may not return views of inputs or aliases of each other: fresh tensors.
    return ([logp.reshape(labels.shape).clone(), lse.reshape(*labels.shape, 2).clone()]
            + [outs[n].reshape(labels.shape).clone() for n in extras])


@token_forward.register_fake
def _(logits, labels, ignore_index, shift, temperature, logit_scale, softcap, extras, backend):
    cdt = _compute_dtype(logits)
    extras = _names(extras)
    return ([labels.new_empty(labels.shape, dtype=cdt), labels.new_empty((*labels.shape, 2), dtype=cdt)]
            + [labels.new_empty(labels.shape, dtype=cdt) for _ in extras])


@torch.library.custom_op("pyfused_po::token_backward", mutates_args=())
def token_backward(logits: Tensor, labels: Tensor, lse: Tensor, entropy: Optional[Tensor],
                   log_sum_sq_probs: Optional[Tensor], grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                   grad_log_sum_sq_probs: Optional[Tensor], grad_mean_logit: Optional[Tensor], ignore_index: int,
                   shift: bool, temperature: float, logit_scale: float, softcap: Optional[float],
                   backend: str) -> Tensor:
    """``∂L/∂logits`` from the per-token upstream gradients (the hand-written backward)."""
    B, T = _rows(labels)
    V = logits.shape[-1]

    def flat(g):
        return None if g is None else g.reshape(B, T).to(lse.dtype).contiguous()

    grad = torch.empty_like(logits).reshape(B, T, V)
    _backend.token_ops(backend).token_backward(
        logits.reshape(B, T, V), labels.reshape(B, T), lse.reshape(B, T, 2).contiguous(), grad,
        entropy=flat(entropy), log_sum_sq_probs=flat(log_sum_sq_probs), grad_logp=flat(grad_logp),
        grad_entropy=flat(grad_entropy), grad_log_sum_sq_probs=flat(grad_log_sum_sq_probs),
        grad_mean_logit=flat(grad_mean_logit), **_kernel_kwargs(ignore_index, shift, temperature, logit_scale,
                                                                softcap))
    return grad.view(logits.shape)


@token_backward.register_fake
def _(logits, labels, lse, entropy, log_sum_sq_probs, grad_logp, grad_entropy, grad_log_sum_sq_probs,
      grad_mean_logit, ignore_index, shift, temperature, logit_scale, softcap, backend):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, labels, ignore_index, shift, temperature, logit_scale, softcap, extras, backend = inputs
    named = dict(zip(_names(extras), output[2:]))
    ctx.save_for_backward(logits, labels, output[1], *[named.get(n) for n in _SAVED])
    ctx.extras = _names(extras)
    ctx.args = (ignore_index, shift, temperature, logit_scale, softcap, backend)


def _backward(ctx, grads):
    logits, labels, lse, entropy, lssp = ctx.saved_tensors
    named = dict(zip(ctx.extras, grads[2:]))
    # is_top1 is not differentiable; the lse output (index 1) is internal.
    grad = token_backward(logits, labels, lse, entropy, lssp, grads[0], named.get("entropy"),
                          named.get("log_sum_sq_probs"), named.get("mean_logit"), *ctx.args)
    return grad, None, None, None, None, None, None, None, None


token_forward.register_autograd(_backward, setup_context=_setup_context)


@_dispatch.register
def compiled_token_logprobs(logits, labels, config, backend):
    """``(logp, *extras)`` through the custom ops (the path taken under ``torch.compile``)."""
    outs = token_forward(logits, labels, config.ignore_index, config.shift, float(config.temperature),
                         float(config.logit_scale), None if config.softcap is None else float(config.softcap),
                         ",".join(config.extras), backend)
    return (outs[0],) + tuple(outs[2:])


# ------------------------------------------------------------------------ fused-linear token stage
# The same pair for linear_token_logprobs.  Outputs are shaped like the labels (the number
# of labelled tokens is data-dependent, so per-token tensors would have no static shape);
# the backward recomputes the labelled-token index from the labels.


def _linear_config(ignore_index, shift, temperature, logit_scale, softcap, extras):
    from .token_logprobs import TokenConfig

    return TokenConfig(ignore_index=ignore_index, shift=shift, temperature=temperature, logit_scale=logit_scale,
                       softcap=softcap, extras=tuple(_names(extras)))


@torch.library.custom_op("pyfused_po::linear_forward", mutates_args=())
def linear_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, ignore_index: int,
                   shift: bool, temperature: float, logit_scale: float, softcap: Optional[float], extras: str,
                   backend: str, impl: str, chunk_tokens: Optional[int],
                   mm_dtype: Optional[torch.dtype], grad_filter: Optional[float]) -> List[Tensor]:
    """``[logp, lse, *extras]`` shaped like ``labels`` (compute dtype; ``lse``: LSE pairs,
    ``labels.shape + (2,)``); ``grad_filter`` is only carried to the backward."""
    from .linear_token_logprobs import linear_forward as forward

    config = _linear_config(ignore_index, shift, temperature, logit_scale, softcap, extras)
    check_label_range(labels, weight.shape[0], ignore_index)  # as in token_forward above
    results, lse, _ = forward(hidden, weight, bias, labels, config, backend, impl, chunk_tokens, mm_dtype)
    return [results[0], lse] + results[1:]


@linear_forward.register_fake
def _(hidden, weight, bias, labels, ignore_index, shift, temperature, logit_scale, softcap, extras, backend, impl,
      chunk_tokens, mm_dtype, grad_filter):
    cdt = _compute_dtype(hidden)
    return ([labels.new_empty(labels.shape, dtype=cdt), labels.new_empty((*labels.shape, 2), dtype=cdt)]
            + [labels.new_empty(labels.shape, dtype=cdt) for _ in _names(extras)])


@torch.library.custom_op("pyfused_po::linear_backward", mutates_args=())
def linear_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, lse: Tensor,
                    entropy: Optional[Tensor], log_sum_sq_probs: Optional[Tensor], grad_logp: Optional[Tensor],
                    grad_entropy: Optional[Tensor], grad_log_sum_sq_probs: Optional[Tensor],
                    grad_mean_logit: Optional[Tensor], need_hidden: bool, need_weight: bool, need_bias: bool,
                    ignore_index: int, shift: bool, temperature: float, logit_scale: float,
                    softcap: Optional[float], backend: str, impl: str, chunk_tokens: Optional[int],
                    mm_dtype: Optional[torch.dtype], grad_filter: Optional[float]) -> List[Tensor]:
    """``[grad_hidden, grad_weight, grad_bias]``; a gradient not asked for is a zero-size tensor."""
    from .linear_token_logprobs import linear_backward as backward

    config = _linear_config(ignore_index, shift, temperature, logit_scale, softcap, "")
    grads = {"logps": grad_logp, "entropy": grad_entropy, "log_sum_sq_probs": grad_log_sum_sq_probs,
             "mean_logit": grad_mean_logit}
    saved = {"entropy": entropy, "log_sum_sq_probs": log_sum_sq_probs}
    out = backward(hidden, weight, bias, labels, lse, saved, grads, config, backend, impl,
                                 chunk_tokens, needs=(need_hidden, need_weight, need_bias), mm_dtype=mm_dtype,
                                 grad_filter=grad_filter)
    empty = hidden.new_empty(0)
    return [empty if g is None else g.contiguous() for g in out]


@linear_backward.register_fake
def _(hidden, weight, bias, labels, lse, entropy, log_sum_sq_probs, grad_logp, grad_entropy, grad_log_sum_sq_probs,
      grad_mean_logit, need_hidden, need_weight, need_bias, *args):
    def like(t, needed):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if needed and t is not None \
            else hidden.new_empty(0)

    return [like(hidden, need_hidden), like(weight, need_weight), like(bias, need_bias)]


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, shift, temperature, logit_scale, softcap, extras, backend, impl, \
        chunk_tokens, mm_dtype, grad_filter = inputs
    named = dict(zip(_names(extras), output[2:]))
    ctx.save_for_backward(hidden, weight, bias, labels, output[1], *[named.get(n) for n in _SAVED])
    ctx.extras = _names(extras)
    ctx.args = (ignore_index, shift, temperature, logit_scale, softcap, backend, impl, chunk_tokens, mm_dtype,
                grad_filter)


def _linear_backward(ctx, grads):
    hidden, weight, bias, labels, lse, entropy, lssp = ctx.saved_tensors
    named = dict(zip(ctx.extras, grads[2:]))
    needs = ctx.needs_input_grad[:3]
    gh, gw, gb = linear_backward(hidden, weight, bias, labels, lse, entropy, lssp, grads[0], named.get("entropy"),
                                 named.get("log_sum_sq_probs"), named.get("mean_logit"), needs[0], needs[1],
                                 bool(needs[2] and bias is not None), *ctx.args)
    return (gh if needs[0] else None, gw if needs[1] else None, gb if needs[2] and bias is not None else None,
            *([None] * 12))


linear_forward.register_autograd(_linear_backward, setup_context=_linear_setup_context)


@_dispatch.register
def compiled_linear_token_logprobs(hidden, weight, bias, labels, config, backend, impl, chunk_tokens, mm_dtype=None,
                                   grad_filter=None):
    """``(logp, *extras)`` through the custom ops (the path taken under ``torch.compile``)."""
    outs = linear_forward(hidden, weight, bias, labels, config.ignore_index, config.shift, float(config.temperature),
                          float(config.logit_scale), None if config.softcap is None else float(config.softcap),
                          ",".join(config.extras), backend, impl, chunk_tokens, mm_dtype, grad_filter)
    return (outs[0],) + tuple(outs[2:])
