"""AOT (Melnyk et al., 2024): distributional alignment via optimal transport, which in one
dimension is sorting: the losses compare the k-th smallest policy quantity with the k-th
smallest reference one across the batch, so pair k's loss depends on the whole batch."""
import torch

from .dpo import _check_label_smoothing
from .registry import ObjectiveOutput, PairBatch, register_objective
from .transforms import smoothed_sigmoid_loss


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
