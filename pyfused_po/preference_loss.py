"""``preference_loss``: the objective stage on per-sequence log-probs."""
from dataclasses import dataclass
from typing import Dict

import torch

from .objectives import PairBatch, get_objective
from .validation import check_positive, check_same_device, check_tensor

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


def resolve_hyperparameters(loss_type, beta, hyperparameters):
    """The objective for ``loss_type`` and its full keyword set, validated."""
    objective = get_objective(loss_type)
    unknown = sorted(set(hyperparameters) - set(objective.hyperparameters))
    if unknown:
        raise TypeError(
            f"loss_type={loss_type!r} got unexpected hyper-parameters {unknown}; "
            f"it takes beta and {sorted(objective.hyperparameters) or 'nothing else'}"
        )
    check_positive("beta", beta)
    values = {**objective.hyperparameters, **hyperparameters}
    if objective.check is not None:
        objective.check(beta=beta, **values)
    return objective, values


def _as_pair_tensor(name, x, like):
    if x is None:
        return None
    check_tensor(name, x, floating=True)
    if tuple(x.shape) != tuple(like.shape):
        raise ValueError(f"{name} must have shape {tuple(like.shape)} (one value per pair, like "
                         f"chosen_logps), got {tuple(x.shape)}")
    return x


def preference_loss(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
                    loss_type="sigmoid", beta=0.1, chosen_lengths=None, rejected_lengths=None,
                    reduction="mean", **hyperparameters) -> PreferenceLossOutput:
    """A preference loss from **summed** per-sequence log-probs.

    Args:
        chosen_logps, rejected_logps: ``[P]`` summed policy log-probs of each pair's
            chosen and rejected response.
        ref_chosen_logps, ref_rejected_logps: ``[P]`` the reference model's; required
            by reference-based losses such as ``"sigmoid"`` (DPO).
        loss_type: a registered loss (``pyfused_po.loss_types()`` lists them).
        beta: inverse temperature of the implicit reward (> 0).
        chosen_lengths, rejected_lengths: ``[P]`` token counts, for losses that average.
        reduction: ``"mean"`` over pairs, ``"sum"``, or ``"none"``.
        **hyperparameters: the loss's own, named as in TRL (e.g. ``label_smoothing``).

    Returns:
        :class:`PreferenceLossOutput` with metrics ``rewards/chosen``, ``rewards/rejected``,
        ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``.
    """
    objective, values = resolve_hyperparameters(loss_type, beta, hyperparameters)
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
    )
    check_same_device(chosen_logps=chosen_logps, rejected_logps=rejected_logps, **inputs)
    if objective.needs_reference and (inputs["ref_chosen_logps"] is None or inputs["ref_rejected_logps"] is None):
        raise ValueError(f"loss_type={loss_type!r} needs ref_chosen_logps and ref_rejected_logps")
    for name in ("chosen_lengths", "rejected_lengths"):
        lengths = inputs[name]
        if lengths is not None and not lengths.is_cuda and bool((lengths < 0).any()):
            raise ValueError(f"{name} must be >= 0, got {lengths.min().item()}")
    # Math in fp32 (or float64 when given float64).
    wide = torch.float64 if chosen_logps.dtype == torch.float64 else torch.float32
    cast = {k: (None if v is None else v.to(wide)) for k, v in inputs.items()}
    batch = PairBatch(chosen_logps.to(wide), rejected_logps.to(wide), **cast)
    out = objective.fn(batch, beta=beta, **values)
    losses = out.losses
    if reduction == "mean":
        loss = losses.sum() / max(losses.numel(), 1)  # an empty batch gives 0, not NaN
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses
    chosen_rewards = out.chosen_rewards.detach()
    rejected_rewards = out.rejected_rewards.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(wide).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": batch.chosen_logps.detach().mean(),
        "logps/rejected": batch.rejected_logps.detach().mean(),
        **{k: v.detach() for k, v in out.metrics.items()},
    }
    return PreferenceLossOutput(loss, losses, metrics, chosen_rewards, rejected_rewards)
