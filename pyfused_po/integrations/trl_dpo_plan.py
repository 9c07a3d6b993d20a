"""``apply(DPOTrainer)`` runs the three-GEMM plan whenever pyfused_po reproduces the trainer's loss.

TRL's DPOTrainer scores the policy's tokens through its fused head and sums them in Python: the LM
head costs four GEMMs per step (logits, the backward's recompute, dH, dW).  The same loss as a
:class:`~pyfused_po.FusedPreferenceLoss` built from the trainer's own ``DPOConfig`` forms its exact
gradient in the forward (:mod:`pyfused_po.plans.fused_gradient`): three GEMMs, and the reference pass one.
:func:`~pyfused_po.integrations.trl_plan.plan_trainer` builds that loss, checks it against the
DPOConfig with the same rules as :func:`~pyfused_po.integrations.trl.use_preference_loss` (every
hyper-parameter, every option) and switches the trainer's loss to it silently when they agree.
When they cannot agree (a DPOConfig that pyfused_po does not reproduce exactly, e.g. ``sigmoid``
and ``robust`` with ``label_smoothing`` > 0, or the MoE router aux loss) the trainer keeps TRL's
loss on pyfused_po's per-token forward
(four GEMMs) and the reason is logged once.  Losses and logged metric names stay TRL's.
"""
__all__ = ["dpo_loss_from_config", "TRL_DPO_METRICS"]

# What TRL 1.15 / 1.16's DPOTrainer logs from its loss (its token metrics are logged separately).
TRL_DPO_METRICS = frozenset({"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                             "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"})


def dpo_loss_from_config(trainer, *, backend="auto", linear_impl="auto"):
    """A :class:`~pyfused_po.FusedPreferenceLoss` with the DPOTrainer's settings (``DPOConfig``'s
    loss types and weights, beta, LD-DPO, WPO weighting, f-divergence, label smoothing for the
    types TRL smooths, DiscoPOP's tau; TRL's labels and the model config's logit transform).
    Raises ``ValueError`` / ``TypeError`` when pyfused_po cannot build it."""
    from ..modules.preference import FusedPreferenceLoss
    from ..objectives import get_objective
    from .hf import lm_head_transform
    from .trl_head import head_owner
    from .trl_preference_loss import TRL_FIXED_HYPERPARAMETERS, TRL_SMOOTHED_LOSS_TYPES

    types = list(trainer.loss_types)
    hyper = {}
    for name in sorted({n for t in types for n in get_objective(t).hyperparameters}):
        if name == "label_smoothing":
            smoothed = any(t in TRL_SMOOTHED_LOSS_TYPES for t in types)
            hyper[name] = float(trainer.label_smoothing) if smoothed else 0.0
        elif name == "discopop_tau":
            hyper[name] = float(trainer.args.discopop_tau)
        elif name in TRL_FIXED_HYPERPARAMETERS:
            hyper[name] = TRL_FIXED_HYPERPARAMETERS[name]
    return FusedPreferenceLoss(types, beta=trainer.beta, loss_weights=[float(w) for w in trainer.loss_weights],
                               ld_alpha=trainer.ld_alpha, use_weighting=trainer.use_weighting,
                               f_divergence_type=trainer.f_divergence_type,
                               f_alpha_divergence_coef=trainer.f_alpha_divergence_coef, shift=False,
                               ignore_index=-100, backend=backend, linear_impl=linear_impl,
                               **lm_head_transform(head_owner(trainer.model)), **hyper)
