"""One policy forward of a TRL trainer's loss on the three-GEMM plan, for losses that separate.

A loss separates when, given constants of the batch fixed before the step, each token's gradient
``∂L/∂log p_t`` depends only on the log-probs of the group it belongs to: a sequence (KTO), or the
token alone (SFT's NLL and DFT).  :func:`policy_step` then runs the policy's LM head as
:class:`~pyfused_po.plans.fused_gradient.FusedHead`: logits per chunk of whole groups, the loss's
gradient, dH and dW in the forward — three GEMMs, no recompute — and returns the per-token values
the trainer's metrics read from the same fold.  When the plan cannot run for the call (grad mode
off, a group longer than a chunk, ...) the same loss runs staged (four GEMMs), same numbers.
"""
import types

import torch

from ..plans.fused_gradient import FusedHead, note_fallback, plan_may_run
from ..token.linear_token_logprobs import linear_token_logprobs

__all__ = ["policy_step", "switch_to_plan"]

_NO_PARALLELISM = types.SimpleNamespace(vocab_parallel=False, sequence_parallel=False)


def policy_step(source, labels, loss_of, token_kwargs, *, extras=(), linear_impl="auto", per_token=False,
                anchor=False, grad_extras=(), owner=None):
    """``(loss, tokens)``.  ``source``: ``(hidden, weight, bias)`` with ``labels`` pre-shifted
    (``token_kwargs["shift"]`` False); ``loss_of(token_logps)``: the scalar loss from per-token
    log-probs shaped like ``labels`` (0 where ignored), separable over rows (``per_token=False``)
    or over tokens (``per_token=True``).  ``tokens``: the policy's per-token values (``logps`` and
    ``extras``), detached.  ``grad_extras``: extras the loss differentiates too (``("entropy",)``
    for an entropy bonus); ``loss_of`` then takes the per-token values (``.logps`` and those
    extras) instead of the log-probs.  ``owner`` (the trainer): when a group is longer than the
    plan's chunk and the staged path runs, the reason is kept in ``owner.fallback_reason`` and
    logged once (:func:`~pyfused_po.plans.fused_gradient.note_fallback`).

    ``anchor=True`` is for a caller that computes the loss's value itself from ``tokens`` (a
    trainer's own code, for its metrics): ``loss`` is then a zero that carries the plan's gradient
    (add it to that value); when the staged path runs instead, ``loss`` is a constant zero and
    ``tokens`` carry the graph, so the caller's own loss on them has the gradient."""
    hidden, weight, bias = source
    extras = tuple(extras) + tuple(n for n in grad_extras if n not in extras)
    # What plan_may_run reads of a loss module: the plan on, its implementation, no parallelism.
    options = types.SimpleNamespace(fused_gradient=True, linear_impl=linear_impl, parallel=_NO_PARALLELISM)
    head = None
    if plan_may_run(options, source):
        head = FusedHead.build(source, labels, token_kwargs, extras=extras, linear_impl=linear_impl,
                               grad_extras=grad_extras)
    chunks = None
    if head is not None:
        if per_token:  # every token its own group: chunks of any tokens
            group, groups = torch.arange(head.pos.numel(), device=head.pos.device), head.pos.numel()
        else:  # rows of the flattened labels
            group = torch.div(head.pos, labels.shape[-1], rounding_mode="floor")
            groups = labels.numel() // labels.shape[-1]
        chunks = head.chunks(group, groups)
        if owner is not None:
            note_fallback(owner, head.fallback_reason)
    read = (lambda tokens: tokens) if grad_extras else (lambda tokens: tokens.logps)
    if chunks is None:  # staged: four GEMMs, same numbers
        tokens = linear_token_logprobs(hidden, weight, labels, bias=bias, extras=extras, impl=linear_impl,
                                       **token_kwargs)
        values = tokens if extras else types.SimpleNamespace(logps=tokens)
        if anchor:
            return torch.zeros((), device=hidden.device), values
        return loss_of(read(values)), values
    head.run(chunks, group, lambda tokens: loss_of(read(tokens)))
    values = head.tokens(extras)
    if anchor:
        loss = torch.zeros((), device=hidden.device)
    else:
        with torch.no_grad():
            loss = loss_of(read(values))
    return head.attach(loss), values


def switch_to_plan(trainer, loss_type, supported, method_name, step, *, refusals=(), **settings):
    """Install ``step`` (bound to ``trainer``) as its ``method_name`` and ``settings`` as
    ``trainer.pyfused_po_settings``; ``ValueError`` naming every reason the plan cannot reproduce the
    trainer's loss: the trainer's own ``refusals``, a ``loss_type`` outside ``supported``, the MoE
    router aux loss, prompt-learning PEFT (virtual tokens prepended to the hidden states)."""
    refusals = list(refusals)
    if loss_type not in supported:
        refusals.append(f"loss_type {loss_type!r} is not one of TRL 1.16's {', '.join(map(repr, supported))}")
    if getattr(trainer, "aux_loss_enabled", False):
        refusals.append("the MoE router aux loss is enabled")
    if getattr(getattr(trainer.model, "active_peft_config", None), "is_prompt_learning", False):
        refusals.append("prompt-learning PEFT prepends virtual tokens to the hidden states")
    if refusals:
        raise ValueError("; ".join(refusals))
    trainer.pyfused_po_settings = dict(settings)
    setattr(trainer, method_name, types.MethodType(step, trainer))
