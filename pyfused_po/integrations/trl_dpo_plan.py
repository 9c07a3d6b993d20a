"""``apply(DPOTrainer)`` runs the three-GEMM plan whenever pyfused_po reproduces the trainer's loss.

TRL's DPOTrainer scores the policy's tokens through its fused head and sums them in Python: the LM
head costs four GEMMs per step (logits, the backward's recompute, dH, dW).  The same loss as a
:class:`~pyfused_po.FusedPreferenceLoss` built from the trainer's own ``DPOConfig`` forms its exact
gradient in the forward (:mod:`pyfused_po.fused_gradient`): three GEMMs, and the reference pass one.
:func:`plan_trainer` builds that loss, checks it against the DPOConfig with the same rules as
:func:`~pyfused_po.integrations.trl.use_preference_loss` (every hyper-parameter, every option) and
switches the trainer's loss to it silently when they agree.  When they cannot agree (a DPOConfig
that pyfused_po does not reproduce exactly, e.g. ``sigmoid`` and ``robust`` with ``label_smoothing``
> 0, or the MoE router aux loss) the trainer keeps TRL's loss on pyfused_po's per-token forward
(four GEMMs) and the reason is logged once.  Losses and logged metric names stay TRL's.
"""
import logging

from .. import _dispatch

__all__ = ["plan_trainer", "dpo_loss_from_config", "TRL_DPO_METRICS"]

logger = logging.getLogger("pyfused_po")
_LOGGED = set()
# What TRL 1.15 / 1.16's DPOTrainer logs from its loss (its token metrics are logged separately).
TRL_DPO_METRICS = frozenset({"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                             "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"})


def _log_once(message):
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.warning(message)


def dpo_loss_from_config(trainer, *, backend="auto", linear_impl="auto"):
    """A :class:`~pyfused_po.FusedPreferenceLoss` with the DPOTrainer's settings (``DPOConfig``'s
    loss types and weights, beta, LD-DPO, WPO weighting, f-divergence, label smoothing for the
    types TRL smooths, DiscoPOP's tau; TRL's labels and the model config's logit transform).
    Raises ``ValueError`` / ``TypeError`` when pyfused_po cannot build it."""
    from ..module import FusedPreferenceLoss
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


@_dispatch.register  # integrations.trl.apply runs it
def plan_trainer(trainer, *, backend="auto", linear_impl="auto"):
    """Switch ``trainer`` (its models already patched by :func:`~pyfused_po.integrations.trl.apply`)
    to the three-GEMM plan where its loss separates; return ``None`` when it did, else the reason
    (also logged once).  Trainers other than ``DPOTrainer`` keep their loss (reason returned)."""
    from trl import DPOTrainer, KTOTrainer

    from .trl_kto_plan import switch_kto_loss
    from .trl_preference_loss import switch_loss

    if not isinstance(trainer, (DPOTrainer, KTOTrainer)):
        return f"{type(trainer).__name__}: no three-GEMM plan for its loss yet; TRL's loss runs on the fused forward"
    try:
        if isinstance(trainer, KTOTrainer):
            switch_kto_loss(trainer, backend=backend, linear_impl=linear_impl)
        else:
            loss_fn = dpo_loss_from_config(trainer, backend=backend, linear_impl=linear_impl)
            switch_loss(trainer, loss_fn, metrics=TRL_DPO_METRICS)
    except (ValueError, TypeError) as error:
        reason = (f"pyfused_po.integrations.trl.apply: {type(trainer).__name__} keeps TRL's loss on pyfused_po's "
                  f"fused forward (4 LM-head GEMMs a step, not 3): {error}")
        _log_once(reason)
        return reason
    return None
