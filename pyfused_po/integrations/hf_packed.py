"""Packed (padding-free) batches through a Hugging Face causal LM and the fused-linear loss.

``input_ids`` ``[1, N]`` hold the sequences back to back; ``position_ids`` (restarting at 0
where a sequence starts, as TRL's padding-free collator makes them) or ``cu_seqlens`` say
where each one starts.  The model gets ``position_ids`` and **no attention mask**: Transformers
then derives the block-diagonal causal mask from the position restarts (``sdpa`` / ``eager``;
flash-attention's varlen kernels read the same ``position_ids``), so no token attends across a
boundary.  The backbone's ``[1, N, D]`` hidden states go to the fused-linear path as they are —
no padding rows anywhere — with the labels shifted inside each sequence.
"""
import torch

from .. import _dispatch
from ..token.linear_token_logprobs import linear_token_logprobs
from ..token.packed_layout import cu_seqlens_to_position_ids, packed_shift, resolve_cu_seqlens
from . import hf
from .lora_head import lora_head_operands

PER_TOKEN_ARGS = ("token_weights", "ref_token_logps", "nll_labels")


@_dispatch.register  # hf.model_preference_loss(..., position_ids=/cu_seqlens=) runs it
def packed_model_preference_loss(model, loss_fn, input_ids, labels, attention_mask, *, position_ids, cu_seqlens,
                                 ref_model, ref_chosen_logps, ref_rejected_logps, shift, loss_kwargs):
    """:func:`pyfused_po.integrations.hf.model_preference_loss` on a packed batch (module docstring)."""
    if attention_mask is not None:
        raise ValueError("a packed batch (position_ids= or cu_seqlens=) takes no attention_mask: the model "
                         "derives the block-diagonal mask from position_ids; got an attention_mask of shape "
                         f"{tuple(attention_mask.shape)}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"packed input_ids must be [1, N], got {got}")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(f"labels must be shaped like input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    # One reference source, per-token inputs shaped like labels (also when called directly, not via hf).
    hf.check_model_inputs(input_ids, labels, None, ref_model, ref_chosen_logps, ref_rejected_logps, loss_kwargs,
                          packed=True)
    cu = resolve_cu_seqlens(labels, cu_seqlens, position_ids)
    if position_ids is None:
        position_ids = cu_seqlens_to_position_ids(cu, labels.numel())
    ignore_index = loss_fn.token_kwargs["ignore_index"]
    if shift:
        # Hidden state t predicts token t + 1 of the same sequence: move the labels (and every
        # per-token argument) one place left inside each sequence, never across a boundary.
        labels = packed_shift(labels, cu, ignore_index)
        for name in PER_TOKEN_ARGS:
            value = loss_kwargs.get(name)
            if value is not None:
                loss_kwargs[name] = packed_shift(value, cu, 0 if value.is_floating_point() else ignore_index)
    hidden = hf.last_hidden_states(model, input_ids, None, position_ids=position_ids)
    refs = dict(ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    if ref_model is not None:
        with torch.no_grad():
            ref_hidden = hf.last_hidden_states(ref_model, input_ids, None, position_ids=position_ids)
            with hf.gathered_lm_head(ref_model) as (ref_w, ref_b):
                ref_lora = lora_head_operands(hf._head(ref_model), ref_hidden)
                if ref_lora is not None:
                    ref_hidden, ref_w, ref_b = ref_lora.hidden, ref_lora.weight, ref_lora.bias
                # Forward-only reference per token; the loss sums it like the policy (LD weights too).
                kw = dict(loss_fn.token_kwargs, shift=False)
                refs = dict(ref_token_logps=linear_token_logprobs(ref_hidden, ref_w, labels, bias=ref_b,
                                                                  impl=loss_fn.linear_impl, **kw))

    def policy_loss(hidden, labels, weight, bias):
        return loss_fn(labels=labels, hidden=hidden, weight=weight, bias=bias, cu_seqlens=cu, **refs, **loss_kwargs)

    lora = lora_head_operands(hf._head(model), hidden)
    if lora is not None:  # a LoRA adapter on the head: its delta enters as extra columns (see lora_head.py)
        return policy_loss(lora.hidden, labels, lora.weight, lora.bias)
    return hf.with_lm_head(model, policy_loss, hidden, labels)
