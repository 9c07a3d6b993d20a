"""A PEFT LoRA adapter on the LM head, through the fused-linear path.

A LoRA head computes ``x Wᵀ + b + Σ_a s_a · B_a (A_a · drop_a(x))``.  Its weight attribute is
the base layer's, so a fused loss reading ``head.weight`` alone would drop the adapter's delta
(and give ``A``, ``B`` no gradient).  The delta is a product of two thin matrices, so the
whole head is one wider linear map:

    logits = [x, s_1 · A_1 drop_1(x), …] · [W, B_1, …]ᵀ + b        (D + Σ r_a columns)

:func:`lora_head_operands` builds those operands; the fused kernel then gives exactly the
head's logits, and its input gradients reach ``A`` (through the extra hidden columns) and
``B`` (through the extra weight columns).  The cost is a ``[V, D + r]`` copy of the head
per call.  Variants that are not a plain low-rank sum (DoRA, ...) are refused.
"""
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["HeadOperands", "lora_head_operands"]


@dataclass
class HeadOperands:
    """``hidden @ weight.T + bias`` equals the LoRA head applied to the original hidden states."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]


def _is_tuner_layer(module):
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(module, BaseTunerLayer)


def lora_head_operands(head, hidden):
    """The operands of ``head`` (an LM head module) as one linear map on ``hidden`` ``[..., D]``.

    Returns ``None`` when ``head`` carries no active, unmerged PEFT adapter (use ``head.weight``
    and ``head.bias`` as they are), else a :class:`HeadOperands`.  Raises ``TypeError`` for an
    adapter this cannot express exactly (not LoRA, DoRA or another variant, ``fan_in_fan_out``,
    ``lora_bias``, a ZeRO-3 partitioned head), naming what to change.
    """
    if not _is_tuner_layer(head):
        return None
    from peft.tuners.lora import Linear as LoraLinear

    name = type(head).__name__
    if not isinstance(head, LoraLinear):
        raise TypeError(f"the LM head carries a PEFT {name} adapter; the fused-linear path supports only plain "
                        "LoRA (peft.tuners.lora.Linear) on the head: remove the head from target_modules")
    if head.disable_adapters:
        if head.merged:
            head.unmerge()  # as PEFT's own forward does when the adapters are disabled
        return None
    if head.merged:
        return None  # the base weight already holds the delta
    active = [a for a in head.active_adapters if a in head.lora_A]
    if not active:
        return None
    for a in active:
        unsupported = [what for what, on in (("a LoRA variant (DoRA, ...)", a in getattr(head, "lora_variant", {})),
                                             ("lora_bias=True", head.lora_bias.get(a, False)),
                                             ("fan_in_fan_out=True", head.fan_in_fan_out)) if on]
        if unsupported:
            raise TypeError(f"LoRA adapter {a!r} on the LM head uses {', '.join(unsupported)}, which the fused-linear "
                            "path cannot express as one linear map: use plain LoRA or remove the head from "
                            "target_modules")
    base = head.get_base_layer()
    weight, bias = base.weight, base.bias
    if hasattr(weight, "ds_id"):
        raise TypeError("a LoRA adapter on a DeepSpeed ZeRO-3 partitioned LM head is not supported by the fused-linear "
                        "path: remove the head from target_modules")
    hidden_cols, weight_cols = [hidden], [weight]
    for a in active:
        lora_a, lora_b = head.lora_A[a], head.lora_B[a]
        x = head.lora_dropout[a](hidden.to(lora_a.weight.dtype))
        hidden_cols.append((lora_a(x) * head.scaling[a]).to(hidden.dtype))
        weight_cols.append(lora_b.weight.to(weight.dtype))
    return HeadOperands(torch.cat(hidden_cols, dim=-1), torch.cat(weight_cols, dim=-1), bias)
