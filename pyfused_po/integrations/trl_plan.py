"""Which TRL trainers' losses :func:`~pyfused_po.integrations.trl.apply` runs on the three-GEMM plan.

The plan (:mod:`pyfused_po.plans.fused_gradient`) forms the exact gradient of the LM head in the
forward, three GEMMs where the trainer's own loss on per-token log-probs costs four, wherever the
loss separates (each token's gradient depends on its own group's log-probs and constants of the
batch).  One module per trainer: ``DPOTrainer`` (:mod:`.trl_dpo_plan`), ``KTOTrainer``
(:mod:`.trl_kto_plan`), ``SFTTrainer`` (:mod:`.trl_sft_plan`), ``GRPOTrainer`` and ``RLOOTrainer``
(:mod:`.trl_rl_plan`, one step for both; their losses in :mod:`.trl_rl_objective`).  A configuration that does not
separate, or that pyfused_po does not reproduce exactly, keeps TRL's loss on pyfused_po's
per-token forward, and the reason is logged once (logger ``pyfused_po``).
"""
import logging

from .. import _dispatch

__all__ = ["plan_trainer", "clear_plan"]

logger = logging.getLogger("pyfused_po")
_LOGGED = set()


def _log_once(message):
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.warning(message)


def _switch(trainer, backend, linear_impl):
    """Switch ``trainer``'s loss to the plan; ``ValueError`` / ``TypeError`` when it cannot.  Returns
    False for a trainer without a plan."""
    from trl import DPOTrainer, GRPOTrainer, KTOTrainer, RLOOTrainer, SFTTrainer

    if isinstance(trainer, DPOTrainer):
        from .trl_dpo_plan import TRL_DPO_METRICS, dpo_loss_from_config
        from .trl_preference_loss import switch_loss

        switch_loss(trainer, dpo_loss_from_config(trainer, backend=backend, linear_impl=linear_impl),
                    metrics=TRL_DPO_METRICS)
    elif isinstance(trainer, KTOTrainer):
        from .trl_kto_plan import switch_kto_loss

        switch_kto_loss(trainer, backend=backend, linear_impl=linear_impl)
    elif isinstance(trainer, SFTTrainer):
        from .trl_sft_plan import switch_sft_loss

        switch_sft_loss(trainer, backend=backend, linear_impl=linear_impl)
    elif isinstance(trainer, GRPOTrainer):
        from .trl_rl_plan import switch_grpo_loss

        switch_grpo_loss(trainer, backend=backend, linear_impl=linear_impl)
    elif isinstance(trainer, RLOOTrainer):
        from .trl_rl_plan import switch_rloo_loss

        switch_rloo_loss(trainer, backend=backend, linear_impl=linear_impl)
    else:
        return False
    return True


# What a plan installs on the trainer: its step (bound to the trainer) and its settings.
_PLAN_METHODS = ("_compute_loss", "compute_loss")
_PLAN_STATE = ("pyfused_po_loss", "pyfused_po_metrics", "pyfused_po_settings")


def clear_plan(trainer):
    """Remove a plan an earlier ``apply`` / ``use_preference_loss`` installed on ``trainer``, so each
    ``apply`` decides afresh from the trainer's settings in force."""
    own = vars(trainer)
    for name in _PLAN_METHODS:
        method = own.get(name)
        if method is not None and getattr(getattr(method, "__func__", None), "__module__", "").startswith(
                "pyfused_po.integrations."):
            del own[name]
    for name in _PLAN_STATE:
        own.pop(name, None)


@_dispatch.register  # integrations.trl.apply runs it
def plan_trainer(trainer, *, backend="auto", linear_impl="auto"):
    """Switch ``trainer`` (its models already patched by :func:`~pyfused_po.integrations.trl.apply`)
    to the three-GEMM plan where its loss separates; return ``None`` when it did, else the reason
    (logged once for the trainers that have a plan).  A plan from an earlier call is removed first."""
    clear_plan(trainer)
    try:
        if _switch(trainer, backend, linear_impl):
            return None
    except (ValueError, TypeError) as error:
        reason = (f"pyfused_po.integrations.trl.apply: {type(trainer).__name__} keeps TRL's loss on pyfused_po's "
                  f"fused forward (4 LM-head GEMMs a step, not 3): {error}")
        _log_once(reason)
        return reason
    return f"{type(trainer).__name__}: no three-GEMM plan for its loss yet; TRL's loss runs on the fused forward"
