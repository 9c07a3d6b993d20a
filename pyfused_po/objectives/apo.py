"""Anchored Preference Optimization (D'Oosterlinck et al., 2024, Eqs. 7–8)."""
import torch

from .registry import ObjectiveOutput, PairBatch, register_objective


@register_objective("apo_zero")
def apo_zero(batch: PairBatch, *, beta):
    """(1 − σ(β·r_w)) + σ(β·r_l): raise the chosen, lower the rejected likelihood."""
    chosen, rejected = batch.logratios()
    losses = (1.0 - torch.sigmoid(beta * chosen)) + torch.sigmoid(beta * rejected)
    return ObjectiveOutput(losses, beta * chosen, beta * rejected)


@register_objective("apo_down", uses_f_divergence=True)
def apo_down(batch: PairBatch, *, beta):
    """σ(β·r_w) + (1 − σ(β·h)), h = s_w − s_l: lower both, the rejected more.  As in TRL v1
    the first term uses the raw log-ratio, the second the f-divergence scores."""
    chosen, rejected = batch.logratios()
    s_chosen, s_rejected = batch.scores()
    losses = torch.sigmoid(beta * chosen) + (1.0 - torch.sigmoid(beta * (s_chosen - s_rejected)))
    return ObjectiveOutput(losses, beta * chosen, beta * rejected)
