"""The model side of the switch for trainers that score tokens themselves (TRL 0.24).

Such a trainer calls ``model(input_ids, ...)`` and reads ``.logits``.  :func:`install_forward`
lets the causal LM answer ``model(..., pyfused_po_head=fn)`` instead with
``fn(causal_lm, last_hidden_state)``: only the backbone runs, and ``fn`` scores the tokens
through :func:`run_head` (the fused-linear path).  The call still goes through every wrapper
around the causal LM (PEFT, DDP, FSDP1, accelerate's autocast), so their hooks act as for the
model's own forward.
"""
import contextlib
import functools
import inspect
import types

import torch

from .hf import backbone, lm_head_transform, with_lm_head
from .lora_head import lora_head_operands
from .trl_head import head_owner, require_causal_lm

__all__ = ["LEGACY_MARK", "install_forward", "replace_method", "run_head", "common_refusals", "method_layout"]

# Marks a causal LM whose forward answers ``pyfused_po_head=``; holds the forward it wrapped.
LEGACY_MARK = "_pyfused_po_legacy_forward"


def install_forward(model, autocast):
    """Let ``model``'s causal LM answer ``model(..., pyfused_po_head=fn)`` with
    ``fn(causal_lm, last_hidden_state)``; other calls run the previous forward (generation is
    unchanged).  ``autocast``: a zero-argument callable returning the context to run in (the
    trainer's ``accelerator.autocast``: accelerate keeps its mixed precision in the forward
    replaced here), or ``None``.  Installing twice is a no-op."""
    target = head_owner(model)
    require_causal_lm(target, "pyfused_po.integrations.trl_legacy.legacy_apply")
    if LEGACY_MARK in vars(target):
        return
    previous = target.forward
    context = autocast or contextlib.nullcontext

    @functools.wraps(type(target).forward)
    def forward(self, *args, pyfused_po_head=None, **kwargs):
        if pyfused_po_head is None:
            return previous(*args, **kwargs)
        if kwargs.pop("labels", None) is not None:  # PEFT passes labels=None; nothing here computes a loss
            raise ValueError("model(..., pyfused_po_head=...) scores its own labels; got labels= as well")
        with context():
            out = backbone(self)(*args, **kwargs)
            return pyfused_po_head(self, out.last_hidden_state)

    target.forward = types.MethodType(forward, target)
    setattr(target, LEGACY_MARK, previous)


def replace_method(trainer, method, replacement, *, backend, impl):
    """Switch ``trainer``: :func:`install_forward` on its ``model`` and ``ref_model`` (when it has one;
    with the trainer's ``accelerator.autocast``), then ``trainer.<method>`` becomes ``replacement``
    bound to it with ``backend=``, ``impl=``.  Returns the trainer."""
    accelerator = getattr(trainer, "accelerator", None)
    autocast = accelerator.autocast if accelerator is not None else None
    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        if isinstance(model, torch.nn.Module):
            install_forward(model, autocast)
    bound = types.MethodType(functools.partial(replacement, backend=backend, impl=impl), trainer)
    setattr(trainer, method, bound)
    return trainer


def run_head(causal_lm, hidden, labels, stage):
    """``stage(hidden, labels, weight, bias, transform)`` with ``causal_lm``'s LM head as full
    tensors: a LoRA adapter on the head enters as extra columns (:mod:`.lora_head`), a ZeRO-3
    head is gathered around the call (:func:`.hf.with_lm_head`).  ``hidden`` is cast to the
    head's dtype outside autocast; ``transform`` is the config's logit transform
    (:func:`.hf.lm_head_transform`)."""
    module = causal_lm.get_output_embeddings()
    hidden = hidden.to(module.weight.device)
    if not torch.is_autocast_enabled(module.weight.device.type):  # under autocast F.linear's rules apply
        hidden = hidden.to(module.weight.dtype)
    labels = labels.to(hidden.device)
    transform = lm_head_transform(causal_lm)
    lora = lora_head_operands(module, hidden)
    if lora is not None:
        return stage(lora.hidden, labels, lora.weight, lora.bias, transform)
    return with_lm_head(causal_lm, lambda h, y, w, b: stage(h, y, w, b, transform), hidden, labels)


def common_refusals(trainer, replaced):
    """Settings of a TRL 0.24 trainer that no replacement of its ``replaced`` method reproduces."""
    refused = []
    if trainer.is_encoder_decoder:
        refused.append("an encoder-decoder model (is_encoder_decoder=True)")
    if trainer.aux_loss_enabled:
        refused.append("the MoE router auxiliary loss (config.output_router_logits=True)")
    if getattr(trainer.args, "use_liger_loss", False):
        refused.append(f"use_liger_loss=True (Liger's fused loss takes the place of {replaced} already)")
    return refused


def method_layout(cls, name, params, companions):
    """How ``cls`` provides the trainer method ``name``: ``"trl"`` when it is TRL's own (defined in
    a ``trl`` module) with parameters ``params`` after ``self``, next to the callable
    ``companions``; ``"overridden"`` when it has that shape but a class outside TRL redefines it
    (what it computes is unknown: a subclass such as LLaMA-Factory's reads other batch keys);
    ``None`` otherwise."""
    method = getattr(cls, name, None)
    if not callable(method) or not all(callable(getattr(cls, c, None)) for c in companions):
        return None
    try:
        if tuple(inspect.signature(method).parameters)[1:] != params:
            return None
    except (TypeError, ValueError):
        return None
    module = getattr(method, "__module__", "") or ""
    return "trl" if module == "trl" or module.startswith("trl.") else "overridden"
