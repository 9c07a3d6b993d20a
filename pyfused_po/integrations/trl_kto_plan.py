"""``apply(KTOTrainer)``: TRL's KTO loss on the three-GEMM plan.

KTO separates over sequences (:mod:`pyfused_po.plans.fused_kto`): given the batch constants — the
reference sums, the KL reference point z₀ (detached in TRL as in pyfused_po), the flags and the
weights — each sequence's loss depends on its own summed log-prob only.  The trainer's step here
is TRL 1.16's ``KTOTrainer._compute_loss`` with the policy's LM head run as the plan
(:class:`~pyfused_po.plans.fused_gradient.FusedHead`: logits, then dH and dW in the forward; no
recompute), and TRL's token metrics (``entropy``, ``logits/*``) read from the plan's own fold.
The KL pass over the mismatched completions and the reference passes stay forward-only (one GEMM
each), through TRL's own code on the switched forward.  Losses and logged metrics are TRL's.

When the plan cannot run for a batch (a sequence longer than a chunk: the reason kept in
``trainer.fallback_reason`` and logged once; grad mode off, ...), the same step runs staged (four
GEMMs) with the same numbers.
"""

import torch

from ..modules.kto import kto_loss
from ..sequence.sums import sequence_sums
from .trl_fused_step import policy_step, switch_to_plan

__all__ = ["switch_kto_loss"]

_EXTRAS = ("entropy", "mean_logit")


def switch_kto_loss(trainer, *, backend="auto", linear_impl="auto"):
    """Run ``trainer``'s loss on the plan (its models already patched); ``ValueError`` naming every
    reason it cannot (:func:`.trl_fused_step.switch_to_plan`)."""
    switch_to_plan(trainer, trainer.loss_type, ("kto", "apo_zero_unpaired"), "_compute_loss", _compute_loss_on_the_plan,
                   backend=backend, linear_impl=linear_impl)


_NON_MODEL_KEYS = {"completion_mask", "KL_input_ids", "KL_attention_mask", "KL_completion_mask", "KL_token_type_ids",
                   "KL_mm_token_type_ids", "label", "ref_logps", "ref_KL_logps"}


def _reference(self, batch, model_kwargs, labels):
    """(reference sums ``[B]``, reference KL sums or None) as TRL's KTOTrainer obtains them."""
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.kto_trainer import is_peft_model
    from trl.trainer.utils import use_adapter

    if self.precompute_ref_logps:
        return batch["ref_logps"], batch["ref_KL_logps"] if self.calculate_KL else None
    ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
    with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
        if is_peft_model(self.model) and self.ref_model is None:
            unwrapped = self.accelerator.unwrap_model(self.model)
            with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                ref_kl = self._compute_kl_logps(self.model, batch)
                out = self.model(**ref_kwargs, labels=labels, fused_lm_head=True)
        else:
            ref_kl = self._compute_kl_logps(self.ref_model, batch)
            out = self.ref_model(**ref_kwargs, labels=labels, fused_lm_head=True)
    return out.log_probs.sum(-1), ref_kl


def _compute_loss_on_the_plan(self, model, inputs, return_outputs=False):
    """KTOTrainer._compute_loss (TRL 1.16) with the policy's head on the three-GEMM plan."""
    if return_outputs:  # logits for compute_metrics: TRL's own step
        return type(self)._compute_loss(self, model, inputs, return_outputs)
    from .hf import lm_head_transform
    from .trl_head import head_owner, trl_head_settings

    mode = "train" if self.model.training else "eval"
    device = self.accelerator.device
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    flags = torch.as_tensor(batch["label"], dtype=torch.bool, device=device)
    kl_logps = self._compute_kl_logps(model, batch)  # forward only (no_grad), as TRL
    model_kwargs = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
    model_kwargs["use_cache"] = False
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    ref_logps, ref_kl_logps = _reference(self, batch, model_kwargs, labels)
    if self.calculate_KL:
        kl = (kl_logps - ref_kl_logps).mean().detach()
        kl = self.accelerator.gather_for_metrics(kl).mean().clamp(min=0)
    else:
        kl = torch.zeros(1, device=device)
    settings = trl_head_settings(model)
    token_kwargs = dict(ignore_index=-100, shift=False, temperature=settings["temperature"],
                        backend=self.pyfused_po_settings["backend"], **lm_head_transform(head_owner(model)))

    def objective(token_logps, labels):
        sums = sequence_sums(token_logps, labels, ignore_index=-100, shift=False).logps
        return kto_loss(sums, ref_logps.to(sums.device), flags, kl=kl, beta=self.beta,
                        desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight,
                        loss_type=self.loss_type)

    captured = {}

    def head_loss(hidden, weight, bias, labels):
        loss, tokens = policy_step((hidden, weight, bias), labels, lambda lp: objective(lp, labels).loss,
                                   token_kwargs, extras=_EXTRAS, linear_impl=self.pyfused_po_settings["linear_impl"],
                                   owner=self)
        with torch.no_grad():
            result = objective(tokens.logps, labels)
        result.loss = loss
        captured.update(tokens=tokens, labels=labels)
        return result

    result = model(**model_kwargs, labels=labels, fused_lm_head=True, pyfused_po_loss=head_loss)
    _log_metrics(self, mode, batch, flags, kl, result, captured)
    return result.loss


def _log_metrics(self, mode, batch, flags, kl, result, captured):
    """TRL 1.16 KTOTrainer's metrics, from the plan's per-token values and sums."""
    gather = self.accelerator.gather_for_metrics
    metrics = self._metrics[mode]
    metrics["kl"].append(kl.item())
    tokens, mask = captured["tokens"], captured["labels"] != -100
    n_tokens = gather(mask.sum()).sum()
    entropy = gather((tokens.entropy * mask).sum()).sum()
    metrics["entropy"].append((entropy / n_tokens).item() if n_tokens > 0 else 0.0)
    if mode == "train":
        tp_size = getattr(self, "_tp_size", 1)  # TRL 1.9-1.14's trainers (.trl_inline) have no tensor-parallel count
        self._total_train_tokens += gather(batch["attention_mask"].sum()).sum().item() // tp_size
    metrics["num_tokens"] = [self._total_train_tokens]
    for name, rows in (("chosen", flags), ("rejected", ~flags)):
        row_mask = mask & rows[:, None]
        total = gather((tokens.mean_logit * row_mask).sum()).sum().item()
        count = gather(row_mask.sum()).sum().item()
        if count > 0:
            metrics[f"logits/{name}"].append(total / count)
    counts = {name: gather(result.metrics[f"count/{name}"].reshape(1)).sum().item() for name in ("chosen", "rejected")}
    for name in ("chosen", "rejected"):
        if counts[name] > 0:
            for kind in ("rewards", "logps"):
                value = gather(result.metrics[f"{kind}/{name}_sum"].reshape(1)).nansum().item()
                metrics[f"{kind}/{name}"].append(value / counts[name])
    if counts["chosen"] > 0 and counts["rejected"] > 0:
        metrics["rewards/margins"].append(metrics["rewards/chosen"][-1] - metrics["rewards/rejected"][-1])
