"""``preference_loss``: the objective stage on per-sequence log-probs."""
from dataclasses import dataclass
from typing import Dict

import torch

from ..compiled_checks import nonnegative
from . import PairBatch, get_objective
from .aot import check_sorted_batch_options
from .checks import check_number
from .transforms import F_DIVERGENCE_TYPES, batch_mean
from ..validation import as_number, check_positive, check_same_device, check_tensor

REDUCTIONS = ("mean", "sum", "none")


@dataclass
class PreferenceLossOutput:
    """``loss``: reduced loss (per pair with ``reduction="none"``); ``losses``: per pair;
    ``metrics``: detached scalars under TRL's names; rewards per pair (detached)."""

    loss: torch.Tensor
    losses: torch.Tensor
    metrics: Dict[str, torch.Tensor]
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


# Hyper-parameters that may be per-pair (or one-element) tensors; every other one is a number.
TENSOR_HYPERPARAMETERS = ("label_smoothing", "bco_delta")


def _loss_type_list(loss_type):
    if isinstance(loss_type, str):
        return [loss_type]
    if isinstance(loss_type, (list, tuple)) and loss_type and all(isinstance(t, str) for t in loss_type):
        if len(set(loss_type)) != len(loss_type):
            raise ValueError(f"loss_type must not repeat a loss, got {list(loss_type)}")
        return list(loss_type)
    raise TypeError(f"loss_type must be a string or a non-empty list of strings, got {loss_type!r}")


def resolve_loss_weights(loss_type, loss_weights):
    """One float weight per loss (all 1.0 when ``loss_weights`` is None)."""
    names = _loss_type_list(loss_type)
    if loss_weights is None:
        return [1.0] * len(names)
    weights = [as_number("loss_weights", w) for w in loss_weights] if isinstance(loss_weights, (list, tuple)) else None
    if weights is None or len(weights) != len(names):
        raise ValueError(f"loss_weights must be a list with one number per loss type ({len(names)} for "
                         f"{names}), got {loss_weights!r}")
    for w in weights:
        check_number("loss_weights entries", w)
    return [float(w) for w in weights]


def resolve_hyperparameters(loss_type, beta, hyperparameters, *, f_divergence_type="reverse_kl",
                            f_alpha_divergence_coef=1.0):
    """``[(objective, its full keyword set)]`` for ``loss_type`` (a name or a list of names),
    validated.  A hyper-parameter applies to every listed loss that takes it."""
    names = _loss_type_list(loss_type)
    objectives = [get_objective(name) for name in names]
    beta = as_number("beta", beta)
    f_alpha_divergence_coef = as_number("f_alpha_divergence_coef", f_alpha_divergence_coef)
    # NumPy scalars and 0-d tensors are numbers; per-pair tensor hyper-parameters stay tensors.
    hyperparameters = {k: as_number(k, v, keep_tensors=k in TENSOR_HYPERPARAMETERS)
                       for k, v in hyperparameters.items()}
    accepted = set().union(*(o.hyperparameters for o in objectives))
    unknown = sorted(set(hyperparameters) - accepted)
    if unknown:
        raise TypeError(
            f"loss_type={loss_type!r} got unexpected hyper-parameters {unknown}; "
            f"it takes beta and {sorted(accepted) or 'nothing else'}"
        )
    check_positive("beta", beta)
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCE_TYPES}, got {f_divergence_type!r}")
    check_number("f_alpha_divergence_coef", f_alpha_divergence_coef)
    if f_divergence_type != "reverse_kl":
        ignoring = [o.name for o in objectives if not o.uses_f_divergence]
        if ignoring:
            raise ValueError(f"f_divergence_type={f_divergence_type!r} does not apply to loss types "
                             f"{ignoring}; use f_divergence_type='reverse_kl' with them")
    resolved = []
    for objective in objectives:
        values = {k: hyperparameters.get(k, default) for k, default in objective.hyperparameters.items()}
        if objective.check is not None:
            objective.check(beta=beta, **values)
        resolved.append((objective, values))
    return resolved


def checked_like(name, x, like, what):
    """``x`` (None passes) checked to be a floating tensor shaped like ``like``; ``what`` says
    what one entry is, for the message (e.g. "one value per pair, like chosen_logps")."""
    if x is None:
        return None
    check_tensor(name, x, floating=True)
    if tuple(x.shape) != tuple(like.shape):
        raise ValueError(f"{name} must have shape {tuple(like.shape)} ({what}), got {tuple(x.shape)}")
    return x


def _as_pair_tensor(name, x, like):
    return checked_like(name, x, like, "one value per pair, like chosen_logps")


def _tensor_hyperparameters(values, like, wide):
    """Per-pair tensor hyper-parameters (e.g. soft labels) → the compute dtype, shape-checked."""
    out = {}
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            check_tensor(name, value, floating=True)
            if value.dim() != 0 and tuple(value.shape) != tuple(like.shape):
                raise ValueError(f"{name} must be a number, a 0-d tensor or one value per pair "
                                 f"{tuple(like.shape)}, got shape {tuple(value.shape)}")
            check_same_device(**{name: value, "chosen_logps": like})
            value = value.detach().to(wide)
        out[name] = value
    return out


def preference_loss(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
                    loss_type="sigmoid", beta=0.1, chosen_lengths=None, rejected_lengths=None,
                    reduction="mean", loss_weights=None, weights=None, f_divergence_type="reverse_kl",
                    f_alpha_divergence_coef=1.0, use_weighting=False, chosen_wpo_logps=None,
                    rejected_wpo_logps=None, nll_logps=None, nll_lengths=None, chosen_kl=None,
                    rejected_kl=None, **hyperparameters) -> PreferenceLossOutput:
    """A preference loss from **summed** per-sequence log-probs.

    Args:
        chosen_logps, rejected_logps: ``[P]`` summed policy log-probs of each pair's
            chosen and rejected response.
        ref_chosen_logps, ref_rejected_logps: ``[P]`` the reference model's; required
            by reference-based losses such as ``"sigmoid"`` (DPO).
        loss_type: a registered loss (``pyfused_po.loss_types()`` lists them), or a list of
            them combined as Σ_k loss_weights[k]·loss_k (MPO).
        beta: inverse temperature of the implicit reward (> 0).
        chosen_lengths, rejected_lengths: ``[P]`` token counts, for losses that average.
        reduction: ``"mean"`` over pairs, ``"sum"``, or ``"none"``.
        loss_weights: one weight per entry of ``loss_type`` (default all 1).
        weights: ``[P]`` per-pair weights multiplying each pair's loss (Sem-DPO,
            margin-adaptive DPO); the mean stays a mean over pairs, not over weights.
        f_divergence_type, f_alpha_divergence_coef: TRL's score transform of the log-ratios
            (``"reverse_kl"`` = DPO, ``"forward_kl"``, ``"js_divergence"``, ``"alpha_divergence"``).
        use_weighting: WPO; each pair's loss is multiplied by w_w·w_l with
            w = exp(``*_wpo_logps``) (detached), where ``chosen_wpo_logps`` /
            ``rejected_wpo_logps`` are ``[P]`` means over the response of log p_t − log Σ_v p_v²
            (:class:`~pyfused_po.FusedPreferenceLoss` computes them).
        nll_logps, nll_lengths: ``[P]`` summed log-probs / token counts of the chosen
            responses over the NLL mask (``sft``, ``cpo``, ``simpo``, ``alphapo``, ``orpo``);
            default ``chosen_logps`` / ``chosen_lengths``.
        chosen_kl, rejected_kl: ``[P]`` summed per-token KL(π_ref ‖ π_θ) along each response
            (:func:`pyfused_po.token_kl`), for ``expo``; they keep their gradient.
        **hyperparameters: the loss's own, named as in TRL (e.g. ``label_smoothing``, which
            may also be a ``[P]`` tensor of soft labels).

    Returns:
        :class:`PreferenceLossOutput` with metrics ``rewards/chosen``, ``rewards/rejected``,
        ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, plus
        the loss's own (e.g. ``nll_loss``, ``log_odds_ratio``).  With several loss types the
        rewards are the first loss's.
    """
    beta = as_number("beta", beta)
    f_alpha_divergence_coef = as_number("f_alpha_divergence_coef", f_alpha_divergence_coef)
    resolved = resolve_hyperparameters(loss_type, beta, hyperparameters, f_divergence_type=f_divergence_type,
                                       f_alpha_divergence_coef=f_alpha_divergence_coef)
    mix = resolve_loss_weights(loss_type, loss_weights)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_tensor("chosen_logps", chosen_logps, floating=True)
    if chosen_logps.dim() != 1:
        raise ValueError(f"chosen_logps must be 1-D [pairs], got shape {tuple(chosen_logps.shape)}")
    rejected_logps = _as_pair_tensor("rejected_logps", rejected_logps, chosen_logps)
    inputs = dict(
        ref_chosen_logps=_as_pair_tensor("ref_chosen_logps", ref_chosen_logps, chosen_logps),
        ref_rejected_logps=_as_pair_tensor("ref_rejected_logps", ref_rejected_logps, chosen_logps),
        chosen_lengths=_as_pair_tensor("chosen_lengths", chosen_lengths, chosen_logps),
        rejected_lengths=_as_pair_tensor("rejected_lengths", rejected_lengths, chosen_logps),
        nll_logps=_as_pair_tensor("nll_logps", nll_logps, chosen_logps),
        nll_lengths=_as_pair_tensor("nll_lengths", nll_lengths, chosen_logps),
        chosen_kl=_as_pair_tensor("chosen_kl", chosen_kl, chosen_logps),
        rejected_kl=_as_pair_tensor("rejected_kl", rejected_kl, chosen_logps),
    )
    extra = dict(
        weights=_as_pair_tensor("weights", weights, chosen_logps),
        chosen_wpo_logps=_as_pair_tensor("chosen_wpo_logps", chosen_wpo_logps, chosen_logps),
        rejected_wpo_logps=_as_pair_tensor("rejected_wpo_logps", rejected_wpo_logps, chosen_logps),
    )
    check_same_device(chosen_logps=chosen_logps, rejected_logps=rejected_logps, **inputs, **extra)
    # Reference log-probs are constants, as every other reference input (ref_logits, ref_token_logps).
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        if inputs[name] is not None:
            inputs[name] = inputs[name].detach()
    check_sorted_batch_options(loss_type, weights=weights, use_weighting=use_weighting, reduction=reduction,
                               label_smoothing=hyperparameters.get("label_smoothing"))
    needs_ref = [o.name for o, _ in resolved if o.needs_reference]
    if needs_ref and (inputs["ref_chosen_logps"] is None or inputs["ref_rejected_logps"] is None):
        raise ValueError(f"loss_type={needs_ref[0]!r} needs ref_chosen_logps and ref_rejected_logps")
    if (inputs["nll_logps"] is None) != (inputs["nll_lengths"] is None):
        raise ValueError("pass nll_logps and nll_lengths together (or neither)")
    if use_weighting and (extra["chosen_wpo_logps"] is None or extra["rejected_wpo_logps"] is None):
        raise ValueError("use_weighting=True (WPO) needs chosen_wpo_logps and rejected_wpo_logps")
    for name in ("chosen_lengths", "rejected_lengths", "nll_lengths"):
        if inputs[name] is not None:  # host-syncing: CPU tensors always, also under torch.compile
            inputs[name] = nonnegative(inputs[name], name)
    # Math in fp32 (or float64 when given float64).
    wide = torch.float64 if chosen_logps.dtype == torch.float64 else torch.float32
    cast = {k: (None if v is None else v.to(wide)) for k, v in inputs.items()}
    batch = PairBatch(chosen_logps.to(wide), rejected_logps.to(wide), **cast,
                      f_divergence_type=f_divergence_type, f_alpha_divergence_coef=float(f_alpha_divergence_coef))
    losses, first, loss_metrics = None, None, {}
    for (objective, values), weight in zip(resolved, mix):
        out = objective.fn(batch, beta=beta, **_tensor_hyperparameters(values, chosen_logps, wide))
        term = out.losses if weight == 1.0 else weight * out.losses
        losses = term if losses is None else losses + term
        first = out if first is None else first
        loss_metrics.update(out.metrics)
    if use_weighting:
        # WPO (Zhou et al., 2024, Eq. 2): detached w_w·w_l, w = exp(mean_t(log p_t − log Σ_v p_v²)).
        pair_weight = torch.exp(extra["chosen_wpo_logps"].detach().to(wide)
                                + extra["rejected_wpo_logps"].detach().to(wide))
        losses = losses * pair_weight
        loss_metrics["wpo_weight"] = batch_mean(pair_weight)
    if extra["weights"] is not None:
        losses = losses * extra["weights"].to(wide)
    if reduction == "mean":
        loss = losses.sum() / max(losses.numel(), 1)  # an empty batch gives 0, not NaN
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses
    chosen_rewards = first.chosen_rewards.detach()
    rejected_rewards = first.rejected_rewards.detach()
    metrics = {
        "rewards/chosen": batch_mean(chosen_rewards),
        "rewards/rejected": batch_mean(rejected_rewards),
        "rewards/accuracies": batch_mean((chosen_rewards > rejected_rewards).to(wide)),
        "rewards/margins": batch_mean(chosen_rewards - rejected_rewards),
        "logps/chosen": batch_mean(batch.chosen_logps.detach()),
        "logps/rejected": batch_mean(batch.rejected_logps.detach()),
        **{k: v.detach() for k, v in loss_metrics.items()},
    }
    return PreferenceLossOutput(loss, losses, metrics, chosen_rewards, rejected_rewards)
