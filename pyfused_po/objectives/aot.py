"""AOT (Melnyk et al., 2024): distributional alignment via optimal transport, which in one
dimension is sorting: the losses compare the k-th smallest policy quantity with the k-th
smallest reference one across the batch, so pair k's loss depends on the whole batch."""
import torch

from .dpo import _check_label_smoothing
from .registry import ObjectiveOutput, PairBatch, register_objective
from .transforms import smoothed_sigmoid_loss

# Losses whose k-th entry belongs to the k-th rank of a sort across the batch, not to pair k.
SORTED_BATCH_LOSSES = ("aot", "aot_unpaired")


def check_sorted_batch_options(loss_type, *, weights=None, use_weighting=False, reduction="mean",
                               label_smoothing=None):
    """Refuse per-pair options with AOT: after sorting, loss k belongs to a rank, not to pair k,
    so per-pair weights, WPO weights, per-pair soft labels or per-pair losses
    (``reduction="none"``) would be attached to the wrong pairs and change with the batch
    order.  TRL refuses AOT with WPO weighting for the same reason."""
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    sorted_losses = [n for n in names if n in SORTED_BATCH_LOSSES]
    if not sorted_losses:
        return
    per_pair_smoothing = isinstance(label_smoothing, torch.Tensor) and label_smoothing.dim() > 0
    given = [option for option, on in (("weights=", weights is not None), ("use_weighting=True", bool(use_weighting)),
                                       ('reduction="none"', reduction == "none"),
                                       ("a per-pair label_smoothing tensor", per_pair_smoothing)) if on]
    if given:
        raise ValueError(
            f"loss_type {sorted_losses[0]!r} sorts the margins across the batch, so its k-th loss belongs to "
            f"the k-th rank, not to pair k: {', '.join(given)} would attach per-pair values to the wrong "
            f"pairs (TRL refuses WPO weighting with AOT for this reason). Use reduction='mean' or 'sum' "
            f"without per-pair weights."
        )


def _rewards(batch, beta):
    chosen, rejected = batch.logratios()
    return beta * chosen, beta * rejected


@register_objective("aot", hyperparameters={"label_smoothing": 0.0}, check=_check_label_smoothing)
def aot(batch: PairBatch, *, beta, label_smoothing):
    """Paired AOT: δ = sort(ℓ_w − ℓ_l) − sort(ℓʳ_w − ℓʳ_l); −(1−ε)·log σ(βδ) − ε·log σ(−βδ)."""
    policy, _ = torch.sort(batch.chosen_logps - batch.rejected_logps, dim=0)
    reference, _ = torch.sort(batch.ref_chosen_logps - batch.ref_rejected_logps, dim=0)
    return ObjectiveOutput(smoothed_sigmoid_loss(beta * (policy - reference), label_smoothing),
                           *_rewards(batch, beta))


@register_objective("aot_unpaired", hyperparameters={"label_smoothing": 0.0}, check=_check_label_smoothing)
def aot_unpaired(batch: PairBatch, *, beta, label_smoothing):
    """Unpaired AOT: δ = sort(r_w) − sort(r_l), r = ℓ − ℓʳ; same smoothed sigmoid."""
    chosen, rejected = batch.logratios()
    delta = torch.sort(chosen, dim=0)[0] - torch.sort(rejected, dim=0)[0]
    return ObjectiveOutput(smoothed_sigmoid_loss(beta * delta, label_smoothing), beta * chosen, beta * rejected)
