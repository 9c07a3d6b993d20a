"""One policy forward of a TRL trainer's loss on the three-GEMM plan, for losses that separate.

A loss separates when, given constants of the batch fixed before the step, each token's gradient
``∂L/∂log p_t`` depends only on the log-probs of the group it belongs to: a sequence (KTO), or the
token alone (SFT's NLL and DFT).  :func:`policy_step` then runs the policy's LM head as
:class:`~pyfused_po.fused_gradient.FusedHead`: logits per chunk of whole groups, the loss's
gradient, dH and dW in the forward — three GEMMs, no recompute — and returns the per-token values
the trainer's metrics read from the same fold.  When the plan cannot run for the call (grad mode
off, a group longer than a chunk, ...) the same loss runs staged (four GEMMs), same numbers.
"""
import types

import torch

from ..fused_gradient import FusedHead, plan_may_run
from ..linear_token_logprobs import linear_token_logprobs

__all__ = ["policy_step"]

_NO_PARALLELISM = types.SimpleNamespace(vocab_parallel=False, sequence_parallel=False)


def policy_step(source, labels, loss_of, token_kwargs, *, extras=(), linear_impl="auto", per_token=False):
    """``(loss, tokens)``.  ``source``: ``(hidden, weight, bias)`` with ``labels`` pre-shifted
    (``token_kwargs["shift"]`` False); ``loss_of(token_logps)``: the scalar loss from per-token
    log-probs shaped like ``labels`` (0 where ignored), separable over rows (``per_token=False``)
    or over tokens (``per_token=True``).  ``tokens``: the policy's per-token values (``logps`` and
    ``extras``), detached."""
    hidden, weight, bias = source
    # What plan_may_run reads of a loss module: the plan on, its implementation, no parallelism.
    options = types.SimpleNamespace(fused_gradient=True, linear_impl=linear_impl, parallel=_NO_PARALLELISM)
    head = None
    if plan_may_run(options, source):
        head = FusedHead.build(source, labels, token_kwargs, extras=extras, linear_impl=linear_impl)
    chunks = None
    if head is not None:
        if per_token:  # every token its own group: chunks of any tokens
            group, groups = torch.arange(head.pos.numel(), device=head.pos.device), head.pos.numel()
        else:  # rows of the flattened labels
            group = torch.div(head.pos, labels.shape[-1], rounding_mode="floor")
            groups = labels.numel() // labels.shape[-1]
        chunks = head.chunks(group, groups)
    if chunks is None:  # staged: four GEMMs, same numbers
        tokens = linear_token_logprobs(hidden, weight, labels, bias=bias, extras=extras, impl=linear_impl,
                                       **token_kwargs)
        logps = tokens if not extras else tokens.logps
        return loss_of(logps), (tokens if extras else types.SimpleNamespace(logps=tokens))
    head.run(chunks, group, lambda tokens: loss_of(tokens.logps))
    values = head.tokens(extras)
    with torch.no_grad():
        loss = loss_of(values.logps)
    return head.attach(loss), values
