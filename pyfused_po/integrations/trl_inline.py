"""``apply(trainer)`` on TRL 1.9–1.14's ``DPOTrainer`` / ``KTOTrainer``, which form the logits inline.

Those trainers (layout: :mod:`.trl_inline_layout`) call ``model(**inputs).logits`` in
``_compute_loss``, ``compute_ref_log_probs`` and (KTO) ``_compute_kl_logps``: ``[rows, seq, vocab]``
logits for every position, prompt and padding included, gathered by ``selective_log_softmax``.
Their loss and metrics are those of TRL 1.15/1.16 on per-token log-probs (checked line by line for
1.9, 1.12 and 1.14: only the logits' source differs, plus the f-divergence scores below), so the switch
is the same as on 1.16, with the fused head given by pyfused_po instead of TRL:

* the models answer TRL 1.15's call ``model(..., labels=, fused_lm_head=True)``
  (:func:`.trl.install_fused_head`: the backbone, then :func:`pyfused_po.linear_token_logprobs` on the
  labelled rows only; other calls run the model's own forward);
* ``_compute_loss`` becomes the three-GEMM plan of 1.16 (DPO: a
  :class:`~pyfused_po.FusedPreferenceLoss` built from the ``DPOConfig``, :mod:`.trl_dpo_plan`; KTO:
  TRL's formula on :class:`~pyfused_po.plans.fused_gradient.FusedHead`, :mod:`.trl_kto_plan`), logging
  TRL's metric names and values (``entropy``, ``mean_token_accuracy``, ``logits/*`` from the same fold);
* ``compute_ref_log_probs`` (reference sums precomputed for an eval set; the train set's are
  precomputed by TRL's ``__init__``, before ``apply`` can run) and KTO's ``_compute_kl_logps`` run
  forward-only through the same head (:mod:`.trl_inline_passes`).

The trainer's own per-token path is not kept as a fallback: it forms the logits.  A setting the
switch cannot reproduce is refused with a ``ValueError`` naming it, the trainer running TRL's own step.
Refused: ``use_liger_kernel`` (TRL's own logit-free loss runs instead of ``_compute_loss``), the MoE
router auxiliary loss, vision batches, prompt-learning PEFT, a ``DPOConfig`` no
``FusedPreferenceLoss`` reproduces, and ``f_divergence_type`` other than ``reverse_kl``: TRL 1.9 drops
f′'s constant (``-exp(-r)``, ``logsigmoid(r)``) and scores ``nca_pair`` / ``bco_pair`` / ``sppo_hard``
with it, 1.12+ keep it as 1.16 does, and the class does not say which it is.
``return_outputs=True`` (``compute_metrics`` in evaluation) runs TRL's own step, logits included.
"""
import types

import torch

from .. import _dispatch
from .trl import install_fused_head
from .trl_inline_layout import inline_layout
from .trl_inline_passes import dpo_compute_ref_log_probs, kto_compute_ref_log_probs, kto_kl_logps

__all__ = ["inline_apply"]
_ALTERNATIVES = ("TRL 0.24's DPOTrainer / KTOTrainer (concatenated_forward; pyfused_po.integrations.trl_legacy), "
                 "TRL 1.9-1.14's (model(**inputs).logits in _compute_loss; pyfused_po.integrations.trl_inline) or "
                 "TRL >= 1.15's trainers (the fused-LM-head protocol; pyfused_po.integrations.trl)")


def _refusals(trainer, kind):
    """What of ``trainer``'s settings the switch cannot reproduce, one line each."""
    out = []
    if getattr(trainer.args, "use_liger_kernel", False) or getattr(trainer, "use_liger_kernel", False):
        out.append("use_liger_kernel=True (TRL's own chunked loss, which forms no [tokens, vocab] logits, runs "
                   "instead of _compute_loss)")
    if getattr(trainer, "aux_loss_enabled", False):
        out.append("the MoE router auxiliary loss (router_aux_loss_coef > 0 with output_router_logits)")
    if getattr(trainer, "_is_vlm", False) or getattr(trainer, "_is_vision_dataset", False):
        out.append("a vision-language model or data set (pixel inputs)")
    if getattr(getattr(trainer.model, "active_peft_config", None), "is_prompt_learning", False):
        out.append("prompt-learning PEFT (virtual tokens prepended to the hidden states)")
    if kind == "DPOTrainer" and trainer.f_divergence_type != "reverse_kl":
        out.append(f"f_divergence_type={trainer.f_divergence_type!r} (TRL 1.9 drops f′'s constant, 1.12+ keep it; "
                   "the class does not say which): use 'reverse_kl'")
    return out


def _checked_kind(trainer):
    """``"DPOTrainer"`` or ``"KTOTrainer"``, or a named error."""
    name = type(trainer).__name__
    found = inline_layout(trainer)
    if found is None:
        raise TypeError(f"{name} has none of the layouts pyfused_po switches: {_ALTERNATIVES}")
    kind, how, overridden = found
    if how == "overridden":
        raise TypeError(f"{name} redefines TRL's {overridden}; pyfused_po.integrations.trl_inline replaces TRL's own "
                        "methods and cannot know what these compute")
    return kind


def _plan(trainer, kind, backend, linear_impl):
    """``install()`` that puts the three-GEMM step on ``trainer``, after every check has passed
    (``ValueError`` naming what the plan cannot reproduce)."""
    if kind == "DPOTrainer":
        from .trl_dpo_plan import TRL_DPO_METRICS, dpo_loss_from_config
        from .trl_preference_loss import check_preference_loss, switch_loss

        loss_fn = dpo_loss_from_config(trainer, backend=backend, linear_impl=linear_impl)
        check_preference_loss(trainer, loss_fn)
        return lambda: switch_loss(trainer, loss_fn, metrics=TRL_DPO_METRICS)
    from .trl_kto_plan import switch_kto_loss

    if trainer.loss_type not in ("kto", "apo_zero_unpaired"):
        raise ValueError(f"loss_type {trainer.loss_type!r} is not one of 'kto', 'apo_zero_unpaired'")
    return lambda: switch_kto_loss(trainer, backend=backend, linear_impl=linear_impl)


@_dispatch.register  # integrations.trl.apply runs it
def inline_apply(trainer, *, backend="auto", linear_impl="auto"):
    """Switch a TRL 1.9–1.14 ``DPOTrainer`` / ``KTOTrainer`` (:func:`.trl_inline_layout.is_inline_trainer`)
    to the fused-linear path (module docstring): its policy, its reference model (or the PEFT
    policy with the adapter disabled) and every later ``_compute_loss`` / ``compute_ref_log_probs``
    (/ ``_compute_kl_logps``).  ``backend`` / ``linear_impl``: as :func:`pyfused_po.linear_token_logprobs`.
    Returns the trainer.  Raises ``TypeError`` for another layout, ``ValueError`` for a setting it
    cannot reproduce (the trainer then runs TRL's own step, also when an earlier call had switched it:
    each call decides from the settings in force)."""
    kind = _checked_kind(trainer)
    refused = _refusals(trainer, kind)
    try:
        install = _plan(trainer, kind, backend, linear_impl) if not refused else None
    except (ValueError, TypeError) as error:
        refused.append(str(error))
    _unswitch(trainer)
    if refused:
        raise ValueError(f"pyfused_po cannot reproduce {type(trainer).__name__}'s step with "
                         f"{'; '.join(refused)}; the trainer runs TRL's own step")
    accelerator = getattr(trainer, "accelerator", None)
    autocast = accelerator.autocast if accelerator is not None else None
    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        if isinstance(model, torch.nn.Module):  # TRL 1.15's head settings: every output, temperature 1, own dtype
            install_fused_head(model, autocast=autocast, backend=backend, linear_impl=linear_impl)
    install()
    if kind == "KTOTrainer":
        trainer._compute_kl_logps = types.MethodType(kto_kl_logps, trainer)
        trainer.compute_ref_log_probs = types.MethodType(kto_compute_ref_log_probs, trainer)
    else:
        trainer.compute_ref_log_probs = types.MethodType(dpo_compute_ref_log_probs, trainer)
    return trainer


def _unswitch(trainer):
    """Remove what an earlier :func:`inline_apply` put on ``trainer`` (its models keep the fused head,
    which answers plain calls with their own forward)."""
    from .trl_plan import clear_plan

    clear_plan(trainer)
    for name in ("compute_ref_log_probs", "_compute_kl_logps"):
        method = vars(trainer).get(name)
        if getattr(getattr(method, "__func__", None), "__module__", "").startswith("pyfused_po.integrations."):
            del vars(trainer)[name]
