"""``apply(SFTTrainer)``: TRL's SFT loss on the three-GEMM plan.

TRL 1.16's ``SFTTrainer`` loss is Σ_t ℓ_t / N over the labelled tokens, with ℓ_t = −log p_t
(``loss_type="nll"``) or −log p_t · sg(p_t) (``"dft"``) and N the batch's token count
(``num_items_in_batch`` or the label mask's sum): each token's gradient depends on its own
log-prob only, so the policy's head runs as the plan (:func:`.trl_fused_step.policy_step`, chunks
of any tokens: padded, packed and padding-free rows alike) and TRL's ``entropy`` /
``mean_token_accuracy`` come from the same fold.  The configurations whose loss reads the full
logits (``compute_loss_func``, label smoothing), DeepSpeed sequence parallelism and
``return_outputs`` run TRL's own ``compute_loss`` for that call; the MoE aux loss and
prompt-learning PEFT keep TRL's loss for the run.
"""

import torch

from .trl_fused_step import policy_step, switch_to_plan

__all__ = ["switch_sft_loss"]

_EXTRAS = ("entropy", "is_top1")


def switch_sft_loss(trainer, *, backend="auto", linear_impl="auto"):
    """Run ``trainer``'s loss on the plan (its model already patched); ``ValueError`` naming every
    reason it cannot (:func:`.trl_fused_step.switch_to_plan`)."""
    switch_to_plan(trainer, trainer.args.loss_type, ("nll", "dft"), "compute_loss", _compute_loss_on_the_plan,
                   backend=backend, linear_impl=linear_impl)


def _needs_trl_step(self, return_outputs):
    """The calls whose loss TRL forms from the full logits or reduces itself."""
    parallelism = getattr(self.accelerator, "parallelism_config", None)
    sequence_parallel = (parallelism is not None and getattr(parallelism, "sp_backend", None) == "deepspeed"
                         and getattr(parallelism, "sp_enabled", False) and self.model.training)
    return (return_outputs or sequence_parallel or self.compute_loss_func is not None
            or self.label_smoother is not None)


def _compute_loss_on_the_plan(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """SFTTrainer.compute_loss (TRL 1.16) with the policy's head on the three-GEMM plan."""
    if _needs_trl_step(self, return_outputs):
        return type(self).compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
    from .hf import lm_head_transform
    from .trl_head import head_owner, trl_head_settings

    mode = "train" if self.model.training else "eval"
    inputs["use_cache"] = False
    dft = self.args.loss_type == "dft"
    token_kwargs = dict(ignore_index=-100, shift=False, temperature=trl_head_settings(model)["temperature"],
                        backend=self.pyfused_po_settings["backend"], **lm_head_transform(head_owner(model)))
    captured = {}

    def head_loss(hidden, weight, bias, labels):
        mask = labels != -100
        count = mask.sum() if num_items_in_batch is None else num_items_in_batch
        count = torch.as_tensor(count, device=labels.device).clamp(min=1)

        def loss_of(token_logps):
            per_token = -token_logps
            if dft:  # DFT: each token's NLL weighted by its detached probability
                per_token = per_token * token_logps.exp().detach()
            return (per_token * mask).sum() / count

        loss, tokens = policy_step((hidden, weight, bias), labels, loss_of, token_kwargs, extras=_EXTRAS,
                                   linear_impl=self.pyfused_po_settings["linear_impl"], per_token=True)
        captured.update(tokens=tokens, mask=mask)
        return loss

    loss = model(**inputs, fused_lm_head=True, pyfused_po_loss=head_loss)
    if self.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * (self.accelerator.num_processes // self.get_tp_size())
    _log_metrics(self, mode, inputs, captured["tokens"], captured["mask"])
    return loss


def _log_metrics(self, mode, inputs, tokens, mask):
    """TRL 1.16 SFTTrainer's token metrics from the plan's fold."""
    gather = self.accelerator.gather_for_metrics
    num_valid = gather(mask.sum()).sum()
    entropy_sum = gather((tokens.entropy * mask).sum()).sum()
    num_correct = gather(((tokens.is_top1 > 0.5) & mask).sum()).sum()
    metrics = self._metrics[mode]
    metrics["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
    metrics["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
    if mode == "train":
        if "attention_mask" in inputs:
            count = gather(inputs["attention_mask"].sum()).sum().item()
        elif "position_ids" in inputs:
            ids = inputs["position_ids"]
            count = gather(torch.tensor(ids.size(1), device=ids.device)).sum().item()
        else:
            raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
        self._total_train_tokens += count // self._tp_size
    metrics["num_tokens"] = [self._total_train_tokens]
