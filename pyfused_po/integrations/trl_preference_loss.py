"""A :class:`~pyfused_po.FusedPreferenceLoss` as the loss of a TRL ``DPOTrainer``.

The policy's hidden states and LM head go straight into the loss inside the model's forward
(the fused head :func:`pyfused_po.integrations.trl.apply` installs), so the per-token
log-probs are never returned and summed in Python.  The trainer's own settings stay in force:
``DPOConfig``'s ``loss_type``/``loss_weights``/``beta``/``ld_alpha``/``use_weighting``/
``f_divergence_type``/``label_smoothing``/``discopop_tau`` must agree with the loss's (each
disagreement is named), because TRL also uses them outside the loss (precomputed reference
sums carry its LD weighting; its logged rewards use its beta).  TRL's token metrics
(``entropy``, ``mean_token_accuracy``, ``num_tokens``) are logged from the same kernel pass.
"""
import contextlib
import math
import types

import torch

from .. import _dispatch
from ..plans.fused_gradient import TokenCapture
from .hf import lm_head_transform
from .trl_head import head_owner

__all__ = ["use_preference_loss", "switch_loss", "check_preference_loss", "dpo_config_mismatches", "TRL_DPO_LOSS_TYPES",
           "TRL_FIXED_HYPERPARAMETERS"]

# DPOTrainer's loss types in TRL 1.15 / 1.16 (the pyfused_po objectives of the same names compute the same losses).
TRL_DPO_LOSS_TYPES = frozenset({"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                                "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"})
# The ones whose TRL loss reads DPOConfig.label_smoothing (TRL 1.15 / 1.16: not sigmoid).
TRL_SMOOTHED_LOSS_TYPES = frozenset({"exo_pair", "robust", "aot", "aot_unpaired"})
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


def _differ(a, b):
    if a is None or b is None:
        return (a is None) != (b is None)
    return not math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)


def dpo_config_mismatches(trainer, loss_fn):
    """The settings where ``loss_fn`` and the ``DPOTrainer``'s ``DPOConfig`` disagree, one line each.

    A loss type TRL lacks (``simpo``, ``hdpo``, ...) is accepted in place of DPOConfig's default
    ``loss_type='sigmoid'`` (one loss, no ``loss_weights``), the only value it can replace without
    contradicting an explicit choice.
    """
    from ..objectives.preference_loss import resolve_loss_weights

    args, out = trainer.args, []
    fused_types = [loss_fn.loss_type] if isinstance(loss_fn.loss_type, str) else list(loss_fn.loss_type)
    trl_types = list(trainer.loss_types)
    fused_weights = resolve_loss_weights(loss_fn.loss_type, loss_fn.objective_kwargs["loss_weights"])
    trl_weights = [float(w) for w in trainer.loss_weights]
    if set(fused_types) <= TRL_DPO_LOSS_TYPES:
        if fused_types != trl_types or fused_weights != trl_weights:
            out.append(f"loss_type/loss_weights: DPOConfig {trl_types} {trl_weights}, loss_fn {fused_types} "
                       f"{fused_weights}")
    elif trl_types != ["sigmoid"] or getattr(args, "loss_weights", None) is not None:
        out.append(f"loss_type: DPOConfig {trl_types} (weights {trl_weights}), loss_fn {fused_types}, which TRL "
                   "lacks; leave DPOConfig's loss_type at its default 'sigmoid' to replace it")
    if _differ(trainer.beta, loss_fn.beta):
        out.append(f"beta: DPOConfig {trainer.beta}, loss_fn {loss_fn.beta}")
    if _differ(trainer.ld_alpha, loss_fn.ld_alpha):
        out.append(f"ld_alpha: DPOConfig {trainer.ld_alpha}, loss_fn {loss_fn.ld_alpha}")
    elif loss_fn.ld_alpha is not None and not loss_fn.ld_alpha_reference:
        out.append("ld_alpha_reference: TRL applies ld_alpha to the reference sums too (also to the precomputed "
                   "ones), loss_fn has ld_alpha_reference=False")
    if bool(trainer.use_weighting) != loss_fn.use_weighting:
        out.append(f"use_weighting: DPOConfig {trainer.use_weighting}, loss_fn {loss_fn.use_weighting}")
    kind = loss_fn.objective_kwargs["f_divergence_type"]
    if trainer.f_divergence_type != kind:
        out.append(f"f_divergence_type: DPOConfig {trainer.f_divergence_type!r}, loss_fn {kind!r}")
    elif kind == "alpha_divergence" and _differ(trainer.f_alpha_divergence_coef,
                                                loss_fn.objective_kwargs["f_alpha_divergence_coef"]):
        out.append(f"f_alpha_divergence_coef: DPOConfig {trainer.f_alpha_divergence_coef}, loss_fn "
                   f"{loss_fn.objective_kwargs['f_alpha_divergence_coef']}")
    out += _hyperparameter_mismatches(trainer, loss_fn, [t for t in fused_types if t in TRL_DPO_LOSS_TYPES])
    if loss_fn.bco_running_mean:
        out.append("bco_running_mean: TRL's bco_pair has no running mean of the rewards (its delta is 0), loss_fn has "
                   "bco_running_mean=True")
    if loss_fn.reduction != "mean":
        out.append(f"reduction: TRL averages the per-pair losses, loss_fn has reduction={loss_fn.reduction!r}")
    return out


# Hyper-parameters of pyfused_po's objectives that TRL 1.15 / 1.16's loss of the same name does not
# have: the value at which pyfused_po computes TRL's loss.  Any other hyper-parameter of a TRL loss
# type without a DPOConfig counterpart is refused (a new one must be added here, or to the reads below).
TRL_FIXED_HYPERPARAMETERS = {"label_smoothing": 0.0, "bco_delta": 0.0}


def _hyperparameter_mismatches(trainer, loss_fn, types):
    """Every objective hyper-parameter of the TRL loss ``types`` against what TRL computes with:
    DPOConfig's ``label_smoothing`` (the types TRL smooths) and ``discopop_tau``, else the fixed value
    of :data:`TRL_FIXED_HYPERPARAMETERS`."""
    from ..objectives import get_objective

    out = []
    for name in sorted({n for t in types for n in get_objective(t).hyperparameters}):
        takers = [t for t in types if name in get_objective(t).hyperparameters]
        value = loss_fn.hyperparameters.get(name, get_objective(takers[0]).hyperparameters[name])
        if name == "label_smoothing":
            trl_value = getattr(trainer, "label_smoothing", 0.0)
            # TRL's own loss is unsmoothed for these whatever DPOConfig says: smoothing would train differently.
            ignored = [t for t in takers if t not in TRL_SMOOTHED_LOSS_TYPES]
            readers = [t for t in takers if t in TRL_SMOOTHED_LOSS_TYPES]
            if ignored and _differ(TRL_FIXED_HYPERPARAMETERS[name], value):
                out.append(f"label_smoothing: TRL's {ignored} ignores DPOConfig's label_smoothing "
                           f"({trl_value}), loss_fn smooths with {value}; use label_smoothing=0.0")
            if readers and _differ(trl_value, value):
                out.append(f"{name}: DPOConfig {trl_value}, loss_fn {value} (used by {readers})")
        elif name == "discopop_tau":
            trl_value = getattr(trainer.args, "discopop_tau", None)
            if trl_value is not None and _differ(trl_value, value):
                out.append(f"{name}: DPOConfig {trl_value}, loss_fn {value} (used by {takers})")
        elif name in TRL_FIXED_HYPERPARAMETERS:
            fixed = TRL_FIXED_HYPERPARAMETERS[name]
            if _differ(fixed, value):
                out.append(f"{name}: TRL's {takers} has no {name} (it computes the loss at {name}={fixed}), "
                           f"loss_fn has {value}; leave it at {fixed}")
        else:
            out.append(f"{name}: TRL's {takers} has no {name} and pyfused_po knows no TRL equivalent of it "
                       f"(loss_fn has {value}); use FusedPreferenceLoss directly instead of TRL's loss")
    return out


@_dispatch.register  # integrations.trl.use_preference_loss runs it
def use_preference_loss(trainer, loss_fn, *, backend=None):
    """Make ``loss_fn`` (a :class:`~pyfused_po.FusedPreferenceLoss`) the loss of a TRL ``DPOTrainer``.

    The policy's hidden states and LM head go straight into ``loss_fn`` inside the model's
    forward; the reference comes from the trainer as TRL computes it (precomputed
    ``ref_chosen_logps`` / ``ref_rejected_logps``, with DPOConfig's LD weighting; the reference
    model; or the PEFT policy with its adapter disabled), as per-token log-probs through the
    fused path.  ``loss_fn`` must agree with the trainer's ``DPOConfig`` (see
    :func:`dpo_config_mismatches`; a ``ValueError`` names every disagreement), use
    ``shift=False`` (labels are shifted here), ``ignore_index=-100`` and the model config's
    logit transform.  Every metric ``loss_fn`` returns is logged under its (TRL) name, and TRL's
    ``entropy``, ``mean_token_accuracy`` and ``num_tokens`` as TRL logs them.  Returns the
    trainer, with :func:`pyfused_po.integrations.trl.apply` already applied.
    """
    from trl import DPOTrainer
    from .trl import check_trl_version, patch_trainer_models

    check_trl_version()
    if not isinstance(trainer, DPOTrainer):
        raise TypeError(f"use_preference_loss supports trl.DPOTrainer, got {type(trainer).__name__}")
    check_preference_loss(trainer, loss_fn)
    patch_trainer_models(trainer, backend=backend or loss_fn.token_kwargs["backend"], linear_impl=loss_fn.linear_impl)
    _install(trainer, loss_fn, metrics=None)
    return trainer


def switch_loss(trainer, loss_fn, *, metrics=None):
    """Make ``loss_fn`` the loss of ``trainer`` (a ``DPOTrainer`` whose models are already patched)
    after the checks of :func:`check_preference_loss`; log only the metric names in ``metrics``
    (``None``: every one ``loss_fn`` returns)."""
    check_preference_loss(trainer, loss_fn)
    _install(trainer, loss_fn, metrics)


def _install(trainer, loss_fn, metrics):
    trainer.pyfused_po_loss = loss_fn
    trainer.pyfused_po_metrics = None if metrics is None else frozenset(metrics)
    trainer._compute_loss = types.MethodType(_compute_loss_with_fused_loss, trainer)


def check_preference_loss(trainer, loss_fn):
    """``ValueError`` naming every reason ``loss_fn`` cannot replace ``trainer``'s DPO loss exactly."""
    kw = loss_fn.token_kwargs
    if kw["shift"] or kw["ignore_index"] != -100:
        raise ValueError("loss_fn must be built with shift=False and ignore_index=-100 (TRL's labels), got "
                         f"shift={kw['shift']}, ignore_index={kw['ignore_index']}")
    if float(kw["temperature"]) != 1.0:
        raise ValueError(f"loss_fn has temperature={kw['temperature']}; DPOTrainer scores tokens at temperature 1")
    expected = lm_head_transform(head_owner(trainer.model))
    got = dict(logit_scale=float(kw["logit_scale"]), softcap=None if kw["softcap"] is None else float(kw["softcap"]))
    if got != expected:
        raise ValueError(f"loss_fn's logit transform {got} differs from the model config's {expected}; build it "
                         "with FusedPreferenceLoss(..., **pyfused_po.integrations.hf.lm_head_transform(model))")
    if getattr(trainer, "aux_loss_enabled", False):
        raise ValueError("use_preference_loss does not add the MoE router aux loss; use apply() with TRL's loss")
    if getattr(trainer, "padding_free", False):
        raise ValueError("use_preference_loss needs the padded [chosen; rejected] batch; DPOConfig has "
                         "padding_free=True")
    peft_config = getattr(trainer.model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        raise ValueError("use_preference_loss does not support prompt-learning PEFT (virtual tokens prepended to "
                         "the hidden states); use apply() with TRL's loss")
    mismatches = dpo_config_mismatches(trainer, loss_fn)
    if mismatches:
        raise ValueError("use_preference_loss: loss_fn disagrees with the trainer's DPOConfig, which TRL also uses "
                         "outside the loss (precomputed reference sums, logged rewards); make them equal:\n  "
                         + "\n  ".join(mismatches))


def _reference_token_logps(trainer, model_kwargs, labels):
    """Per-token reference log-probs ``[2P, T-1]`` the way DPOTrainer obtains them."""
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter
    from trl.trainer.dpo_trainer import is_peft_model

    ctx = contextlib.nullcontext()
    model = trainer.ref_model
    if model is None:
        model = trainer.model
        if is_peft_model(trainer.model):
            unwrapped = trainer.accelerator.unwrap_model(trainer.model)
            ctx = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
    no_checkpointing = disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs)
    with torch.no_grad(), no_checkpointing, ctx:
        return model(**model_kwargs, labels=labels, fused_lm_head=True).log_probs


@contextlib.contextmanager
def _policy_token_extras(loss_fn, extras, captured):
    """While active, ``loss_fn``'s policy token values also include ``extras`` (for TRL's token
    metrics, from the same fold) and land in ``captured["policy"]``: from the three-GEMM plan
    (:class:`~pyfused_po.plans.fused_gradient.TokenCapture`, detached values) or, when the staged plan
    runs, from its first token-stage call (the policy's)."""
    capture = TokenCapture(extras)
    had_own = "_token_stage" in vars(loss_fn)
    original = loss_fn._token_stage

    def stage(source, labels, *, extras=(), inplace=False):
        if not capture.waiting:
            return original(source, labels, extras=extras, inplace=inplace)
        wanted = tuple(extras) + tuple(e for e in capture.extras if e not in extras)
        out = original(source, labels, extras=wanted, inplace=inplace)
        capture.offer(out)
        return out

    loss_fn._token_stage = stage
    loss_fn.token_capture = capture
    try:
        yield
        captured["policy"] = capture.tokens
    finally:
        if had_own:
            loss_fn._token_stage = original
        else:
            del loss_fn._token_stage
        del loss_fn.token_capture


def _log_token_metrics(trainer, mode, tokens, labels, inputs):
    """TRL's DPOTrainer token metrics from the policy's per-token extras (labels shifted)."""
    gather = trainer.accelerator.gather_for_metrics
    mask = labels != -100
    n_valid = gather(mask.sum()).sum()
    entropy = gather((tokens.entropy.detach() * mask).sum()).sum()
    trainer._metrics[mode]["entropy"].append((entropy / n_valid).item() if n_valid > 0 else 0.0)
    chosen_mask = mask[: mask.shape[0] // 2]
    correct = gather(((tokens.is_top1[: mask.shape[0] // 2] > 0.5) & chosen_mask).sum()).sum()
    n_chosen = gather(chosen_mask.sum()).sum()
    trainer._metrics[mode]["mean_token_accuracy"].append((correct / n_chosen).item() if n_chosen > 0 else 0.0)
    if mode == "train":
        tp_size = getattr(trainer, "_tp_size", 1)  # TRL 1.9-1.14's trainers (.trl_inline) have no tensor-parallel count
        trainer._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // tp_size
    trainer._metrics[mode]["num_tokens"] = [trainer._total_train_tokens]


def _compute_loss_with_fused_loss(self, model, inputs, return_outputs=False):
    """DPOTrainer._compute_loss with ``self.pyfused_po_loss`` as the objective."""
    if return_outputs:
        if self.pyfused_po_metrics is not None:  # apply()'s automatic plan: TRL's own step for this call
            return type(self)._compute_loss(self, model, inputs, return_outputs)
        raise ValueError("use_preference_loss computes no logits; evaluate with prediction_loss_only=True")
    mode = "train" if self.model.training else "eval"
    loss_fn = self.pyfused_po_loss
    model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
    model_kwargs["use_cache"] = False
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    refs = {}
    types = {loss_fn.loss_type} if isinstance(loss_fn.loss_type, str) else set(loss_fn.loss_type)
    # TRL scores the reference for every loss type it has (sft too: its logged rewards are β·(ℓ − ℓʳ)).
    if loss_fn.needs_reference or types <= TRL_DPO_LOSS_TYPES:
        if self.precompute_ref_logps:
            refs = dict(ref_chosen_logps=inputs["ref_chosen_logps"], ref_rejected_logps=inputs["ref_rejected_logps"])
        else:
            refs = dict(ref_token_logps=_reference_token_logps(self, model_kwargs, labels))
    captured = {}

    def objective(hidden, weight, bias, labels):
        captured["labels"] = labels
        with _policy_token_extras(loss_fn, ("entropy", "is_top1"), captured):
            return loss_fn(labels=labels, hidden=hidden, weight=weight, bias=bias, **refs)

    result = model(**model_kwargs, labels=labels, fused_lm_head=True, pyfused_po_loss=objective)
    for name, value in result.metrics.items():
        if self.pyfused_po_metrics is not None and name not in self.pyfused_po_metrics:
            continue
        value = torch.as_tensor(value, device=self.accelerator.device).detach().float().reshape(1)
        self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value).mean().item())
    _log_token_metrics(self, mode, captured["policy"], captured["labels"], inputs)
    return result.loss
