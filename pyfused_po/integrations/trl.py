"""TRL: route the trainers' per-token log-probs through pyfused_po's fused-linear path.

TRL ≥ 1.16 never asks a model for logits in its preference trainers: ``DPOTrainer`` and
``KTOTrainer`` patch ``model.forward`` with ``trl.trainer.utils.add_fused_lm_head`` and call
``model(..., labels=labels, fused_lm_head=True)``, which returns a ``FusedCausalLMOutput``
of per-token ``log_probs`` (and ``entropy``, ``mean_logits``, ``is_top1``,
``log_sum_sq_probs`` for the metrics and WPO).  :func:`apply` replaces that patched
forward with one of the same contract computed by :func:`pyfused_po.linear_token_logprobs`
(hand-written backward; no ``dW`` GEMM under LoRA's frozen head), so every ``loss_type``,
``ld_alpha``, ``use_weighting`` and logged metric of the trainer works unchanged.

:func:`use_preference_loss` goes one step further and makes a
:class:`~pyfused_po.FusedPreferenceLoss` the trainer's loss, for the loss types TRL lacks
(H-DPO, SimPO, EXPO's pairwise-free variants, …); its metrics are logged under TRL's names.

Supported: TRL ``>= 1.16, < 2`` (:data:`SUPPORTED_TRL`); other versions raise.
"""
import contextlib
import functools
import types
import warnings
from importlib import metadata

import torch

from ..linear_token_logprobs import linear_token_logprobs
from .hf import backbone, lm_head_transform, with_lm_head

__all__ = ["SUPPORTED_TRL", "apply", "patch_model", "use_preference_loss", "check_trl_version"]

SUPPORTED_TRL = (">=1.16", "<2")
_MIN, _MAX = (1, 16), (2, 0)
# TRL's output names → pyfused_po's extras (TRL says "mean_logits", the kernel "mean_logit").
_EXTRAS = {"entropy": "entropy", "log_sum_sq_probs": "log_sum_sq_probs", "mean_logits": "mean_logit",
           "is_top1": "is_top1"}
_ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_MARK = "_pyfused_po_fused_forward"


def _release(version):
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece else ""
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (2 - len(parts)))


def check_trl_version():
    """Raise ``RuntimeError`` unless the installed TRL has the fused-LM-head protocol this
    module replaces (TRL ``>= 1.16, < 2``); return the version string."""
    try:
        version = metadata.version("trl")
    except metadata.PackageNotFoundError:
        raise RuntimeError("pyfused_po.integrations.trl needs TRL (pip install 'trl>=1.16,<2')") from None
    if not (_MIN <= _release(version) < _MAX):
        raise RuntimeError(
            f"pyfused_po.integrations.trl supports TRL {','.join(SUPPORTED_TRL)} (the trainers that call "
            f"model(..., fused_lm_head=True)); found trl=={version}. Install 'trl>=1.16,<2'.")
    from trl.trainer import utils
    if not hasattr(utils, "add_fused_lm_head") or not hasattr(utils, "FusedCausalLMOutput"):
        raise RuntimeError(f"trl=={version} lacks trl.trainer.utils.add_fused_lm_head / FusedCausalLMOutput, "
                           "the protocol pyfused_po.integrations.trl plugs into")
    return version


def _inner(model):
    """The model whose ``forward`` TRL patched: the base model under a PEFT wrapper."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _prepared_with_autocast(target):
    """True when ``accelerate``'s ``prepare`` has wrapped ``target.forward`` in its mixed-precision
    autocast (it keeps the unwrapped forward as ``_original_forward``)."""
    return "_original_forward" in vars(target)


def patch_model(model, *, outputs=_ALL_OUTPUTS, temperature=1.0, backend="auto", linear_impl="auto",
                autocast=None):
    """Give ``model`` (a Transformers causal LM, or a PEFT model wrapping one) TRL's fused-head
    call: ``model(..., labels=labels, fused_lm_head=True)`` returns a
    ``trl.trainer.utils.FusedCausalLMOutput`` computed by pyfused_po.  Without
    ``fused_lm_head=True`` the previous forward runs (generation is unchanged).

    ``outputs``: TRL names of the per-token fields to compute (``log_probs`` always).
    ``temperature``: the logits are divided by it (TRL's DPO/KTO use 1).
    ``backend`` / ``linear_impl``: as :func:`pyfused_po.linear_token_logprobs`.
    ``autocast``: a zero-argument callable returning a context manager to run the fused forward
    in, e.g. ``accelerator.autocast``.  Needed only when the model was already prepared by
    ``accelerate`` with mixed precision: that autocast lives in the ``forward`` this patch
    replaces (:func:`apply` passes the trainer's).  A model prepared after patching is wrapped
    by ``accelerate`` as usual.
    The model config's logit softcap / scale is applied as Transformers applies it.

    Extra keyword ``pyfused_po_loss=callable`` (used by :func:`use_preference_loss`) calls
    ``callable(hidden=..., weight=..., bias=..., labels=...)`` on the shifted hidden states
    inside the forward (where ZeRO-3 expects the head to be used) and returns its result.
    """
    check_trl_version()
    from trl.trainer.utils import FusedCausalLMOutput

    target = _inner(model)
    unknown = [o for o in outputs if o not in _ALL_OUTPUTS]
    if unknown:
        raise ValueError(f"outputs must be names from {_ALL_OUTPUTS}, got unknown {unknown}")
    extras = tuple(_EXTRAS[o] for o in _ALL_OUTPUTS[1:] if o in outputs)
    transform = lm_head_transform(target)
    text_config = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    previous = getattr(target, "_pyfused_po_previous_forward", None) or target.forward
    if autocast is None and _prepared_with_autocast(target):
        warnings.warn(f"{type(target).__name__}.forward was wrapped by accelerate's mixed-precision autocast, which "
                      "this patch replaces; pass autocast=accelerator.autocast to keep it", stacklevel=2)
    context = autocast or contextlib.nullcontext

    @functools.wraps(type(target).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                pyfused_po_loss=None, **kwargs):
        if not fused_lm_head:
            passed = dict(labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)
            return previous(*args, **{k: v for k, v in passed.items() if v is not None}, **kwargs)
        with context():
            return fused_forward(self, args, labels, shift_labels, num_items_in_batch, pyfused_po_loss, kwargs)

    def fused_forward(self, args, labels, shift_labels, num_items_in_batch, pyfused_po_loss, kwargs):
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        out = backbone(self)(*args, **kwargs)
        # Hidden state t predicts token t + 1 unless the labels come pre-shifted (context parallelism).
        hidden, shift = out.last_hidden_state, shift_labels is None
        labels = labels if shift else shift_labels
        head_weight = self.get_output_embeddings().weight
        hidden, labels = hidden.to(head_weight.device), labels.to(head_weight.device)
        if not torch.is_autocast_enabled(head_weight.device.type):  # under autocast the head GEMMs cast (F.linear's rule)
            hidden = hidden.to(head_weight.dtype)

        def head_stage(hidden, labels, weight, bias):  # runs where ZeRO-3 expects the head to be used
            if pyfused_po_loss is not None:
                if shift:  # the loss module takes pre-shifted inputs
                    hidden, labels = hidden[:, :-1], labels[:, 1:]
                return pyfused_po_loss(hidden=hidden, weight=weight, bias=bias, labels=labels)
            # shift=True reads hidden row t for label t + 1 in place: no copy of the hidden states.
            return linear_token_logprobs(hidden, weight, labels, bias=bias, extras=extras, temperature=temperature,
                                         backend=backend, impl=linear_impl, shift=shift, **transform)

        res = with_lm_head(self, head_stage, hidden, labels)
        if pyfused_po_loss is not None:
            return res
        if shift:  # TRL's fields are aligned with labels[:, 1:]
            labels = labels[:, 1:]
            res = res[:, 1:] if not extras else type(res)(*(None if t is None else t[:, 1:] for t in res))
        got = dict(log_probs=res) if not extras else dict(res._asdict(), log_probs=res.logps)
        mask = labels != -100
        fields = dict(log_probs=got["log_probs"], entropy=got.get("entropy"), label_mask=mask)
        # As in TRL: mean_logits and log_sum_sq_probs carry no gradient, is_top1 is boolean.
        for trl_name, name in (("mean_logits", "mean_logit"), ("log_sum_sq_probs", "log_sum_sq_probs")):
            fields[trl_name] = None if got.get(name) is None else got[name].detach()
        fields["is_top1"] = None if got.get("is_top1") is None else (got["is_top1"] > 0.5) & mask
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -fields["log_probs"].sum() / denom
        aux_loss = None
        if kwargs.get("output_router_logits"):
            from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
            n_exp = getattr(text_config, "num_experts", None) or getattr(self, "num_experts", None)
            n_tok = getattr(text_config, "num_experts_per_tok", None) or getattr(self, "num_experts_per_tok", None)
            aux_loss = load_balancing_loss_func(out.router_logits, n_exp, n_tok, kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss=loss, aux_loss=aux_loss, **fields)

    target.forward = types.MethodType(forward, target)
    target._pyfused_po_previous_forward = previous
    setattr(target, _MARK, dict(outputs=tuple(outputs), temperature=temperature, backend=backend))
    return model


def _trainer_classes():
    from trl import DPOTrainer, KTOTrainer
    return DPOTrainer, KTOTrainer


def apply(trainer_or_model, *, backend="auto", linear_impl="auto"):
    """One-call switch: route a TRL trainer's (or a model's) per-token log-probs through pyfused_po.

    ``trainer_or_model``: a ``trl.DPOTrainer`` or ``trl.KTOTrainer`` (policy and reference
    model both switched; for PEFT without a reference model the adapter-disabled policy is
    the reference, and goes through the same path), or a Transformers causal LM (all TRL
    per-token outputs available).  Returns its argument.  Call it after constructing the
    trainer and before ``train()``.  Raises ``RuntimeError`` on unsupported TRL versions,
    ``TypeError`` on other trainers.
    """
    check_trl_version()
    DPOTrainer, KTOTrainer = _trainer_classes()
    kw = dict(backend=backend, linear_impl=linear_impl)
    if isinstance(trainer_or_model, torch.nn.Module):
        return patch_model(trainer_or_model, **kw)
    trainer = trainer_or_model
    if isinstance(trainer, DPOTrainer):
        # The fields DPOTrainer asks add_fused_lm_head for (its metrics, and WPO's weights).
        outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
        outputs += ("log_sum_sq_probs",) if trainer.use_weighting else ()
    elif isinstance(trainer, KTOTrainer):
        outputs = ("log_probs", "entropy", "mean_logits")
    else:
        raise TypeError(f"pyfused_po.integrations.trl.apply supports trl.DPOTrainer and trl.KTOTrainer "
                        f"(or a model), got {type(trainer).__name__}")
    # The trainer prepares the reference model at construction (the policy only in train()): its
    # forward already carries accelerate's autocast, which the patch must keep.  Entering the
    # trainer's autocast again inside a model prepared later is the same autocast, nested.
    kw["autocast"] = trainer.accelerator.autocast
    patch_model(trainer.model, outputs=outputs, **kw)
    if getattr(trainer, "ref_model", None) is not None:
        patch_model(trainer.ref_model, outputs=("log_probs",), **kw)
    return trainer


_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


def use_preference_loss(trainer, loss_fn, *, backend=None):
    """Make ``loss_fn`` (a :class:`~pyfused_po.FusedPreferenceLoss`) the loss of a TRL ``DPOTrainer``.

    The policy's hidden states and LM head go straight into ``loss_fn`` inside the model's
    forward; the reference comes from the trainer as TRL computes it (precomputed
    ``ref_chosen_logps`` / ``ref_rejected_logps``, the reference model, or the PEFT policy
    with its adapter disabled), as per-token log-probs through the fused path.  The trainer's
    ``loss_type``/``beta``/... are ignored: ``loss_fn`` decides.  ``loss_fn`` must use
    ``shift=False`` (labels are shifted here), ``ignore_index=-100`` and the model config's
    logit transform.  Every metric ``loss_fn`` returns is logged under its (TRL) name.
    Returns the trainer, with :func:`apply` already applied.
    """
    check_trl_version()
    DPOTrainer, _ = _trainer_classes()
    if not isinstance(trainer, DPOTrainer):
        raise TypeError(f"use_preference_loss supports trl.DPOTrainer, got {type(trainer).__name__}")
    kw = loss_fn.token_kwargs
    if kw["shift"] or kw["ignore_index"] != -100:
        raise ValueError("loss_fn must be built with shift=False and ignore_index=-100 (TRL's labels), got "
                         f"shift={kw['shift']}, ignore_index={kw['ignore_index']}")
    expected = lm_head_transform(_inner(trainer.model))
    got = dict(logit_scale=float(kw["logit_scale"]), softcap=None if kw["softcap"] is None else float(kw["softcap"]))
    if got != expected:
        raise ValueError(f"loss_fn's logit transform {got} differs from the model config's {expected}; build it "
                         "with FusedPreferenceLoss(..., **pyfused_po.integrations.hf.lm_head_transform(model))")
    if getattr(trainer, "aux_loss_enabled", False):
        raise ValueError("use_preference_loss does not add the MoE router aux loss; use apply() with TRL's loss")
    apply(trainer, backend=backend or kw["backend"], linear_impl=loss_fn.linear_impl)
    trainer.pyfused_po_loss = loss_fn
    trainer._compute_loss = types.MethodType(_compute_loss_with_fused_loss, trainer)
    return trainer


def _reference_token_logps(trainer, model_kwargs, labels):
    """Per-token reference log-probs ``[2P, T-1]`` the way DPOTrainer obtains them."""
    import contextlib
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
    with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs), ctx:
        return model(**model_kwargs, labels=labels, fused_lm_head=True).log_probs


def _compute_loss_with_fused_loss(self, model, inputs, return_outputs=False):
    """DPOTrainer._compute_loss with ``self.pyfused_po_loss`` as the objective."""
    if return_outputs:
        raise ValueError("use_preference_loss computes no logits; evaluate with prediction_loss_only=True")
    mode = "train" if self.model.training else "eval"
    loss_fn = self.pyfused_po_loss
    model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
    model_kwargs["use_cache"] = False
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    refs = {}
    if loss_fn.needs_reference:
        if self.precompute_ref_logps:
            refs = dict(ref_chosen_logps=inputs["ref_chosen_logps"], ref_rejected_logps=inputs["ref_rejected_logps"])
        else:
            refs = dict(ref_token_logps=_reference_token_logps(self, model_kwargs, labels))

    def objective(hidden, weight, bias, labels):
        return loss_fn(labels=labels, hidden=hidden, weight=weight, bias=bias, **refs)

    result = model(**model_kwargs, labels=labels, fused_lm_head=True, pyfused_po_loss=objective)
    for name, value in result.metrics.items():
        value = torch.as_tensor(value, device=self.accelerator.device).detach().float().reshape(1)
        self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value).mean().item())
    return result.loss
