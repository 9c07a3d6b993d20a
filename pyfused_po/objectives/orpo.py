"""ORPO (Hong et al., 2024): odds-ratio preference optimization, in TRL's ORPOTrainer form."""
import torch
import torch.nn.functional as F

from .registry import ObjectiveOutput, PairBatch, register_objective
from .transforms import log1mexp


@register_objective("orpo", needs_reference=False)
def orpo(batch: PairBatch, *, beta):
    """NLL − β·log σ(log-odds), log-odds = (ℓ̄_w − ℓ̄_l) − (log(1 − e^{ℓ̄_w}) − log(1 − e^{ℓ̄_l}))
    with ℓ̄ = ℓ/n.  ℓ̄ is clamped just below 0 so a response of probability 1 (or an empty one)
    gives a finite value (and no gradient).  Rewards β·ℓ̄; metrics ``log_odds_ratio`` (mean
    log σ(log-odds)), ``log_odds_chosen`` (mean log-odds) and ``nll_loss``."""
    tiny = torch.finfo(batch.chosen_logps.dtype).tiny
    chosen = batch.average("chosen")
    rejected = batch.average("rejected")
    log_odds = (chosen - rejected) - (log1mexp(chosen.clamp(max=-tiny)) - log1mexp(rejected.clamp(max=-tiny)))
    ratio = F.logsigmoid(log_odds)
    nll = batch.nll()
    metrics = {"log_odds_ratio": ratio.mean(), "log_odds_chosen": log_odds.mean(), "nll_loss": nll}
    return ObjectiveOutput(nll - beta * ratio, beta * chosen, beta * rejected, metrics)
