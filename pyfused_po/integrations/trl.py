"""TRL: route the trainers' per-token log-probs through pyfused_po's fused-linear path.

Since TRL 1.15 no trainer asks a model for logits to score tokens: ``SFTTrainer``,
``DPOTrainer``, ``KTOTrainer``, ``GRPOTrainer``, ``RLOOTrainer`` (and the experimental
``AsyncGRPOTrainer``) patch ``model.forward`` with ``trl.trainer.utils.add_fused_lm_head``
and call ``model(..., labels=labels, fused_lm_head=True)``, which returns a
``FusedCausalLMOutput`` of per-token ``log_probs`` (and ``entropy``, ``mean_logits``,
``is_top1``, ``log_sum_sq_probs`` for the metrics and WPO).  :func:`apply` replaces that
patched forward with one of the same contract computed by
:func:`pyfused_po.linear_token_logprobs` (hand-written backward; no ``dW`` GEMM under LoRA's
frozen head), keeping the settings TRL gave it (temperature, ``cast_lm_head_to_fp32``, the
outputs the trainer asked for), so every loss and logged metric of the trainer works unchanged.

:func:`use_preference_loss` (:mod:`.trl_preference_loss`) goes one step further and makes a
:class:`~pyfused_po.FusedPreferenceLoss` the ``DPOTrainer``'s loss.

Supported: every TRL release with the fused-LM-head protocol (TRL ``>= 1.15``; checked on the
protocol itself, :func:`check_trl_version`).  Older releases raise, naming what to use instead,
except the ``DPOTrainer`` / ``KTOTrainer`` of TRL 0.24 (:mod:`.trl_legacy`) and TRL 1.9–1.14
(:mod:`.trl_inline`), which :func:`apply` switches by their own layouts.
"""
import contextlib
import dataclasses
import inspect
import warnings
from importlib import metadata
from typing import Optional

import torch

from .. import _dispatch
from ..token.linear_token_logprobs import linear_token_logprobs
from ..token.token_logprobs import TokenLogprobs
from ..token.truncated_support import sampler_spec
from .hf import backbone, lm_head_transform, with_lm_head
from .lora_head import lora_head_operands
from .rl import rl_token_logprobs
from .trl_head import head_owner, require_causal_lm, trl_head_settings
from .trl_inline_layout import is_inline_trainer
from .trl_legacy import is_legacy_trainer, legacy_apply
from .trl_orpo_cpo import is_orpo_cpo_trainer, switch as switch_orpo_cpo
from .trl_patch_state import PatchState, install_patch, patch_state, plain_forward
from .trl_sampler import sampler_truncation

__all__ = ["SUPPORTED_TRL", "apply", "patch_model", "patch_trainer_models", "use_preference_loss",
           "check_trl_version", "trl_head_settings"]

SUPPORTED_TRL = (">=1.15",)
_MIN = (1, 15)  # the release that introduced add_fused_lm_head / FusedCausalLMOutput
# TRL's output names → pyfused_po's extras (TRL says "mean_logits", the kernel "mean_logit").
_EXTRAS = {"entropy": "entropy", "log_sum_sq_probs": "log_sum_sq_probs", "mean_logits": "mean_logit",
           "is_top1": "is_top1"}
_ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_PROTOCOL_FIELDS = {"loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask",
                    "aux_loss"}
_PROTOCOL_ARGS = {"temperature", "cast_lm_head_to_fp32", "outputs"}
_OLD_TRL_ROUTE = (
    "upgrade to 'trl>=1.15' (the DPOTrainer / KTOTrainer of TRL 0.24 and of TRL 1.9-1.14: apply() switches them "
    "through pyfused_po.integrations.trl_legacy.legacy_apply and pyfused_po.integrations.trl_inline.inline_apply), "
    "or leave the trainer's loss alone and compute the preference loss yourself with "
    "pyfused_po.integrations.hf.model_preference_loss(model, FusedPreferenceLoss(...), input_ids, labels, "
    "attention_mask, ref_model=...) (e.g. in an overridden compute_loss), or per-token log-probs with "
    "pyfused_po.linear_token_logprobs on pyfused_po.integrations.hf.last_hidden_states(model, ...) and the LM head "
    "(README: 'Use it with TRL')")


def _release(version):
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece else ""
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (2 - len(parts)))


def check_trl_version():
    """Raise ``RuntimeError`` unless the installed TRL has the fused-LM-head protocol this module
    replaces; return the version string.

    The protocol: ``trl.trainer.utils.add_fused_lm_head(model, temperature, cast_lm_head_to_fp32,
    outputs)`` and ``FusedCausalLMOutput`` with TRL 1.15's fields.  Releases before 1.15 (e.g. 1.8,
    which axolotl pins; ≤ 0.24, which LLaMA-Factory pins) have neither; the error says what to use.
    """
    try:
        version = metadata.version("trl")
    except metadata.PackageNotFoundError:
        raise RuntimeError("pyfused_po.integrations.trl needs TRL (pip install 'trl>=1.15')") from None
    if _release(version) < _MIN:
        raise RuntimeError(
            f"found trl=={version}, which predates TRL 1.15's fused-LM-head protocol (trainers calling "
            f"model(..., fused_lm_head=True)) that pyfused_po.integrations.trl plugs into: {_OLD_TRL_ROUTE}")
    from trl.trainer import utils
    add, output = getattr(utils, "add_fused_lm_head", None), getattr(utils, "FusedCausalLMOutput", None)
    problems = []
    if add is None or output is None:
        problems.append("no trl.trainer.utils.add_fused_lm_head / FusedCausalLMOutput")
    else:
        missing_args = _PROTOCOL_ARGS - set(inspect.signature(add).parameters)
        fields = set(getattr(output, "__dataclass_fields__", {}))
        missing_fields = _PROTOCOL_FIELDS - fields
        if missing_args:
            problems.append(f"add_fused_lm_head lacks {sorted(missing_args)}")
        if missing_fields:
            problems.append(f"FusedCausalLMOutput lacks {sorted(missing_fields)}")
    if problems:
        raise RuntimeError(f"trl=={version}'s fused-LM-head protocol differs from TRL 1.15's ({'; '.join(problems)}), "
                           f"so pyfused_po.integrations.trl cannot replace it: {_OLD_TRL_ROUTE}")
    return version


def _prepared_with_autocast(target):
    """True when ``accelerate``'s ``prepare`` has wrapped ``target.forward`` in its mixed-precision
    autocast (it keeps the unwrapped forward as ``_original_forward``)."""
    return "_original_forward" in vars(target)


def patch_model(model, *, outputs=None, temperature=None, cast_lm_head_to_fp32=None, backend="auto",
                linear_impl="auto", autocast=None, truncation=None):
    """Give ``model`` (a Transformers causal LM, or a PEFT model wrapping one, or an FSDP1 / DDP
    wrapper around either) TRL's fused-head call: ``model(..., labels=labels, fused_lm_head=True)``
    returns a ``trl.trainer.utils.FusedCausalLMOutput`` computed by pyfused_po.  Without
    ``fused_lm_head=True`` the previous forward runs (generation is unchanged).

    ``outputs``, ``temperature``, ``cast_lm_head_to_fp32``: as TRL's ``add_fused_lm_head``.  Each
    left ``None`` keeps what TRL set on this model (:func:`trl_head_settings`), or on a model TRL
    did not patch: every output, temperature 1, the head in the model's precision.
    ``backend`` / ``linear_impl``: as :func:`pyfused_po.linear_token_logprobs`.
    ``autocast``: a zero-argument callable returning a context manager to run the fused forward
    in, e.g. ``accelerator.autocast``.  Needed only when the model was already prepared by
    ``accelerate`` with mixed precision: that autocast lives in the ``forward`` this patch
    replaces (:func:`apply` passes the trainer's).  A model prepared after patching is wrapped
    by ``accelerate`` as usual.
    The model config's logit softcap / scale is applied as Transformers applies it.  A PEFT LoRA
    adapter on the LM head is applied (:mod:`.lora_head`; TRL's own head reads the base weight).

    ``truncation``: ``dict(top_k=, top_p=, min_p=, sampler_order=)`` (None: the full softmax): the
    log-probs and entropy are those of the sampler's truncated distribution
    (:func:`pyfused_po.integrations.rl.rl_token_logprobs`, staged: 4 LM-head GEMMs in a training
    step); only ``log_probs`` and ``entropy`` can be asked for.

    Extra keyword ``pyfused_po_loss=callable`` (used by :func:`use_preference_loss`) calls
    ``callable(hidden=..., weight=..., bias=..., labels=...)`` on the shifted hidden states
    inside the forward (where ZeRO-3 expects the head to be used) and returns its result.
    """
    check_trl_version()
    return install_fused_head(model, outputs=outputs, temperature=temperature,
                              cast_lm_head_to_fp32=cast_lm_head_to_fp32, backend=backend, linear_impl=linear_impl,
                              autocast=autocast, truncation=truncation)


def install_fused_head(model, *, outputs=None, temperature=None, cast_lm_head_to_fp32=None, backend="auto",
                       linear_impl="auto", autocast=None, truncation=None):
    """:func:`patch_model` without the check that the installed TRL has the fused-LM-head protocol:
    also for TRL releases whose trainers form the logits themselves (:mod:`.trl_inline` gives their
    steps this call).  Where TRL lacks ``FusedCausalLMOutput`` the result is a :class:`FusedHeadOutput`
    with the same fields."""
    target = head_owner(model)
    require_causal_lm(target, "pyfused_po.integrations.trl.patch_model")
    found = trl_head_settings(target) or dict(temperature=1.0, cast_lm_head_to_fp32=False, outputs=_ALL_OUTPUTS)
    outputs = tuple(found["outputs"] if outputs is None else outputs)
    temperature = float(found["temperature"] if temperature is None else temperature)
    cast_fp32 = bool(found["cast_lm_head_to_fp32"] if cast_lm_head_to_fp32 is None else cast_lm_head_to_fp32)
    unknown = [o for o in outputs if o not in _ALL_OUTPUTS]
    if unknown:
        raise ValueError(f"outputs must be names from {_ALL_OUTPUTS}, got unknown {unknown}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if truncation is not None:
        sampler_spec(temperature=temperature, top_k=truncation.get("top_k"), top_p=truncation.get("top_p"),
                     min_p=truncation.get("min_p"), order=truncation.get("sampler_order", "hf"))
        beyond = [o for o in outputs if o not in ("log_probs", "entropy")]
        if beyond:
            raise ValueError(f"a truncated support gives log_probs and entropy only; outputs also ask for {beyond}")
    if autocast is None and _prepared_with_autocast(target):
        warnings.warn(f"{type(target).__name__}.forward was wrapped by accelerate's mixed-precision autocast, which "
                      "this patch replaces; pass autocast=accelerator.autocast to keep it", stacklevel=2)
    previous, looked_through = plain_forward(target)
    state = PatchState(outputs=outputs, temperature=temperature, cast_lm_head_to_fp32=cast_fp32, backend=backend,
                       linear_impl=linear_impl, autocast=autocast, previous=previous,
                       previous_context=autocast if looked_through else None, truncation=truncation)
    install_patch(target, state, _patched_forward)
    return model


@dataclasses.dataclass
class FusedHeadOutput:
    """The fields of TRL 1.15's ``FusedCausalLMOutput``, for TRL releases that lack the class (their
    trainers never call the fused head; pyfused_po's steps for them do, :mod:`.trl_inline`)."""
    loss: Optional[torch.Tensor] = None
    log_probs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None
    label_mask: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None


def _output_class():
    """TRL's ``FusedCausalLMOutput`` where the installed TRL has it, else :class:`FusedHeadOutput`."""
    try:
        from trl.trainer.utils import FusedCausalLMOutput
    except ImportError:
        return FusedHeadOutput
    return FusedCausalLMOutput


def _patched_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                     pyfused_po_loss=None, **kwargs):
    """The forward :func:`patch_model` installs.  Everything it needs is read from ``self`` (the
    module it runs on) and its :class:`PatchState`, so a ``copy.deepcopy`` of the model computes
    with the copy's weights, and a later :func:`patch_model` replaces the settings."""
    state = patch_state(self)
    if not fused_lm_head:
        passed = dict(labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)
        with (state.previous_context or contextlib.nullcontext)():
            return state.previous(*args, **{k: v for k, v in passed.items() if v is not None}, **kwargs)
    with (state.autocast or contextlib.nullcontext)():
        return _fused_forward(self, state, args, labels, shift_labels, num_items_in_batch, pyfused_po_loss, kwargs)


def _fused_forward(self, state, args, labels, shift_labels, num_items_in_batch, pyfused_po_loss, kwargs):
    output_class = _output_class()
    extras = tuple(_EXTRAS[o] for o in _ALL_OUTPUTS[1:] if o in state.outputs)
    cast_fp32, transform = state.cast_lm_head_to_fp32, lm_head_transform(self)
    text_config = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
    kwargs["use_cache"] = False
    if getattr(text_config, "output_router_logits", False):
        kwargs.setdefault("output_router_logits", True)
    out = backbone(self)(*args, **kwargs)
    # Hidden state t predicts token t + 1 unless the labels come pre-shifted (context parallelism).
    hidden, shift = out.last_hidden_state, shift_labels is None
    labels = labels if shift else shift_labels
    head = self.get_output_embeddings()
    head_weight = head.weight
    hidden, labels = hidden.to(head_weight.device), labels.to(head_weight.device)
    if cast_fp32:
        hidden = hidden.float()
    elif not torch.is_autocast_enabled(head_weight.device.type):  # under autocast the head GEMMs cast (F.linear)
        hidden = hidden.to(head_weight.dtype)

    def head_stage(hidden, labels, weight, bias):  # runs where ZeRO-3 expects the head to be used
        head_context = contextlib.nullcontext()
        if cast_fp32:  # TRL's cast_lm_head_to_fp32: the head's GEMMs in float32, outside autocast
            head_context = torch.autocast(hidden.device.type, enabled=False)
            weight, bias = weight.float(), None if bias is None else bias.float()
        with head_context:
            if state.truncation is not None:
                if pyfused_po_loss is not None:
                    raise ValueError("a loss on pyfused_po's three-GEMM plan scores the full softmax; this model "
                                     "was patched with a sampler's truncation (truncated_support=True)")
                logps, entropy = rl_token_logprobs(labels, hidden=hidden, weight=weight, bias=bias,
                                                   temperature=state.temperature, with_entropy="entropy" in extras,
                                                   shift=shift, backend=state.backend, **transform, **state.truncation)
                return TokenLogprobs(logps, entropy=entropy) if extras else logps
            if pyfused_po_loss is not None:
                if shift:  # the loss module takes pre-shifted inputs
                    hidden, labels = hidden[:, :-1], labels[:, 1:]
                return pyfused_po_loss(hidden=hidden, weight=weight, bias=bias, labels=labels)
            # shift=True reads hidden row t for label t + 1 in place: no copy of the hidden states.
            return linear_token_logprobs(hidden, weight, labels, bias=bias, extras=extras,
                                         temperature=state.temperature, backend=state.backend,
                                         impl=state.linear_impl, shift=shift, **transform)

    lora = lora_head_operands(head, hidden)
    if lora is not None:  # a LoRA adapter on the head: its delta enters as extra columns
        res = head_stage(lora.hidden, labels, lora.weight, lora.bias)
    else:
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
    return output_class(loss=loss, aux_loss=aux_loss, **fields)


# The trainers of TRL 1.15 / 1.16 that call model(..., fused_lm_head=True); any other trainer
# whose model carries TRL's fused head is switched too.
KNOWN_TRAINERS = ("SFTTrainer", "DPOTrainer", "KTOTrainer", "GRPOTrainer", "RLOOTrainer", "AsyncGRPOTrainer")


def apply(trainer_or_model, *, backend="auto", linear_impl="auto", truncated_support=False):
    """One-call switch: route a TRL trainer's (or a model's) per-token log-probs through pyfused_po.

    ``trainer_or_model``: a TRL trainer whose model TRL gave a fused LM head (``SFTTrainer``,
    ``DPOTrainer``, ``KTOTrainer``, ``GRPOTrainer``, ``RLOOTrainer``, ``AsyncGRPOTrainer``, and any
    later one that uses ``add_fused_lm_head``): its ``model`` and, when TRL patched it,
    ``ref_model`` are switched with TRL's settings for each (temperature, ``cast_lm_head_to_fp32``,
    the outputs the trainer reads); for PEFT without a reference model the adapter-disabled policy
    is the reference and goes through the same path.  Or a Transformers causal LM: TRL's settings
    on it are kept, and a model TRL did not patch gets every per-token output at temperature 1.
    A ``DPOTrainer`` whose ``DPOConfig`` pyfused_po reproduces exactly also gets its loss as a
    :class:`~pyfused_po.FusedPreferenceLoss` (the three-GEMM plan, :mod:`.trl_dpo_plan`), with TRL's
    loss values and logged metrics; otherwise TRL's loss stays and the reason is logged once.
    ``truncated_support=True`` (``GRPOTrainer`` / ``RLOOTrainer``; off by default, as TRL scores the
    full softmax): the policy's log-probs and entropy are those of the distribution its sampler drew
    from, truncated by the trainer's ``top_k`` / ``top_p`` / ``min_p``
    (:func:`.trl_sampler.sampler_truncation`; the reference model keeps the full softmax).  They run
    staged, 4 LM-head GEMMs a step, with TRL's loss (the three-GEMM plan scores the full softmax).
    A sampled token outside the kept set (only by rounding at a boundary) has log-prob −inf.
    Returns its argument.  Call it after constructing the trainer and before ``train()``.  Raises
    ``RuntimeError`` on TRL releases without the protocol, ``TypeError`` on a trainer that does not
    use TRL's fused head (there is nothing to switch).
    TRL's ``ORPOTrainer`` / ``CPOTrainer`` (which form ``[2B, T, V]`` logits themselves, in every
    release) go to :func:`.trl_orpo_cpo.switch`.
    On TRL releases whose ``DPOTrainer`` / ``KTOTrainer`` compute their own log-probs, the trainer goes
    to :func:`.trl_legacy.legacy_apply` (``concatenated_forward``, TRL 0.24) or to
    :func:`.trl_inline.inline_apply` (logits formed in ``_compute_loss``, TRL 1.9–1.14), decided by what
    the trainer class looks like, not by its version.
    """
    if not isinstance(trainer_or_model, torch.nn.Module) and is_orpo_cpo_trainer(trainer_or_model):
        return switch_orpo_cpo(trainer_or_model, backend=backend, linear_impl=linear_impl)
    if not isinstance(trainer_or_model, torch.nn.Module) and is_legacy_trainer(trainer_or_model):
        return legacy_apply(trainer_or_model, backend=backend, linear_impl=linear_impl)
    if not isinstance(trainer_or_model, torch.nn.Module) and is_inline_trainer(trainer_or_model):
        inline_apply = _dispatch.entry("inline_apply")  # .trl_inline builds on this module
        return inline_apply(trainer_or_model, backend=backend, linear_impl=linear_impl)
    check_trl_version()
    if isinstance(trainer_or_model, torch.nn.Module):
        if truncated_support:
            raise TypeError("truncated_support=True reads the sampler's settings from a GRPOTrainer / RLOOTrainer; "
                            "for a model, pass truncation=dict(top_k=, top_p=, min_p=) to patch_model")
        return patch_model(trainer_or_model, backend=backend, linear_impl=linear_impl)
    truncation = sampler_truncation(trainer_or_model) if truncated_support else None
    patch_trainer_models(trainer_or_model, backend=backend, linear_impl=linear_impl, truncation=truncation)
    _dispatch.entry("plan_trainer")(trainer_or_model, backend=backend, linear_impl=linear_impl)
    return trainer_or_model


def patch_trainer_models(trainer, *, backend="auto", linear_impl="auto", truncation=None):
    """:func:`patch_model` on the trainer's ``model`` (with ``truncation``) and (when TRL patched it)
    ``ref_model`` (full softmax), with TRL's settings for each and the trainer's autocast; the
    trainer's loss is left as it is."""
    kw = dict(backend=backend, linear_impl=linear_impl)
    model = getattr(trainer, "model", None)
    if not isinstance(model, torch.nn.Module) or trl_head_settings(model) is None:
        raise TypeError(
            f"pyfused_po.integrations.trl.apply switches TRL trainers whose model carries TRL's fused LM head "
            f"(trl.trainer.utils.add_fused_lm_head: {', '.join(KNOWN_TRAINERS)} in TRL >= 1.15), or a model; "
            f"{type(trainer).__name__} has none, so it never calls model(..., fused_lm_head=True)")
    # The trainer may prepare the reference model at construction (the policy only in train()): its
    # forward already carries accelerate's autocast, which the patch must keep.  Entering the
    # trainer's autocast again inside a model prepared later is the same autocast, nested.
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None:
        kw["autocast"] = accelerator.autocast
    patch_model(model, **kw, truncation=truncation)
    ref_model = getattr(trainer, "ref_model", None)
    if isinstance(ref_model, torch.nn.Module) and trl_head_settings(ref_model) is not None:
        patch_model(ref_model, **kw)
    return trainer


def use_preference_loss(trainer, loss_fn, *, backend=None):
    """Make ``loss_fn`` (a :class:`~pyfused_po.FusedPreferenceLoss`) the loss of a TRL ``DPOTrainer``;
    see :func:`pyfused_po.integrations.trl_preference_loss.use_preference_loss`."""
    use = _dispatch.entry("use_preference_loss")  # .trl_preference_loss builds on this module
    return use(trainer, loss_fn, backend=backend)
