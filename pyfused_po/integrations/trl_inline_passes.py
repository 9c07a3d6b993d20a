"""TRL 1.9–1.14's forward-only passes through the fused head (:mod:`.trl_inline`).

``DPOTrainer.compute_ref_log_probs(model, inputs)`` sums the reference log-probs of a batch being
precomputed (LD-DPO weighted as TRL weights them); ``KTOTrainer._compute_kl_logps(model, batch)``
scores the mismatched KL completions and its ``compute_ref_log_probs(model, inputs)`` the reference
(completion and KL sums).  TRL forms the ``[rows, seq, vocab]`` logits for each; here each is a sum
over the completion tokens of :func:`fused_token_logps` (label ``t + 1`` at position ``t`` where the
completion mask of ``t + 1`` is set), the model inputs as TRL passes them.
"""
import contextlib

import torch

from ..sequence.sums import ld_token_weights

__all__ = ["reference_context", "fused_token_logps", "dpo_compute_ref_log_probs", "kto_kl_logps",
           "kto_compute_ref_log_probs"]

_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}

# Batch keys that are not model inputs of the KL pass (TRL 1.9's list); the KL inputs are renamed.
_NOT_KL_INPUTS = {"input_ids", "attention_mask", "completion_mask", "KL_completion_mask", "KL_token_type_ids",
                  "KL_mm_token_type_ids", "label", "ref_logps", "ref_KL_logps"}


def kto_kl_logps(self, model, batch):
    """Drop-in for ``KTOTrainer._compute_kl_logps``: the KL completions' summed log-probs ``[B]``
    without a gradient, or ``None`` when the loss needs no KL estimate."""
    if not self.calculate_KL:
        return None
    kwargs = {k: v for k, v in batch.items() if k not in _NOT_KL_INPUTS}
    kwargs["input_ids"] = kwargs.pop("KL_input_ids")
    kwargs["attention_mask"] = kwargs.pop("KL_attention_mask")
    kwargs["use_cache"] = False
    # The KL rows have their own width after flush_left: their own token-type tensors, as TRL passes them.
    for name in ("token_type_ids", "mm_token_type_ids"):
        if f"KL_{name}" in batch:
            kwargs[name] = batch[f"KL_{name}"]
    with torch.no_grad():
        return fused_token_logps(model, kwargs, batch["KL_completion_mask"]).sum(-1)


def kto_compute_ref_log_probs(self, model, inputs):
    """Drop-in for ``KTOTrainer.compute_ref_log_probs``: ``(completion sums [B], KL sums [B] or None)``
    of the reference (the reference model, or the PEFT policy with its adapter disabled)."""
    with reference_context(self):
        logps = _sums(model, inputs, "")
        kl_logps = _sums(model, inputs, "KL_") if self.calculate_KL else None
    return logps, kl_logps


def _sums(model, inputs, prefix):
    """Summed completion log-probs of the rows ``{prefix}input_ids`` (TRL passes ids and attention mask only)."""
    kwargs = dict(input_ids=inputs[f"{prefix}input_ids"], attention_mask=inputs[f"{prefix}attention_mask"],
                  use_cache=False)
    return fused_token_logps(model, kwargs, inputs[f"{prefix}completion_mask"]).sum(-1)


@contextlib.contextmanager
def reference_context(trainer):
    """What TRL's reference passes run under: no gradient, gradient checkpointing off, and with
    PEFT and no reference model the adapter disabled (or the ``"ref"`` adapter, when loaded)."""
    from accelerate.utils import is_peft_model
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs))
        if trainer.ref_model is None and is_peft_model(trainer.model):
            unwrapped = trainer.accelerator.unwrap_model(trainer.model)
            stack.enter_context(use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None))
        yield


def fused_token_logps(model, model_kwargs, mask):
    """Per-token log-probs ``[R, T-1]`` of ``model_kwargs["input_ids"][:, 1:]`` where ``mask[:, 1:]`` is
    set (0 elsewhere), through the fused head: logits only for those rows, one chunk at a time."""
    labels = model_kwargs["input_ids"].masked_fill(mask == 0, -100)
    return model(**model_kwargs, labels=labels, fused_lm_head=True).log_probs[:, -(labels.shape[1] - 1):]


def dpo_compute_ref_log_probs(self, model, inputs):
    """Drop-in for TRL 1.9–1.14's ``DPOTrainer.compute_ref_log_probs``: the reference sums of a
    padded ``[chosen; rejected]`` batch, LD-DPO weighted as TRL weights them."""
    model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
    model_kwargs["use_cache"] = False
    with reference_context(self):
        per_token = fused_token_logps(model, model_kwargs, inputs["completion_mask"])
    mask = inputs["completion_mask"][:, 1:].bool()
    if self.ld_alpha is not None:  # shared prefix weight 1, the longer side's tail ld_alpha
        per_token = per_token * ld_token_weights(mask, self.ld_alpha, dtype=per_token.dtype)
    return per_token.sum(-1).chunk(2, dim=0)
