"""ORPO (Hong et al., 2024): odds-ratio preference optimization, in TRL's ORPOTrainer form."""
import torch
import torch.nn.functional as F

from .registry import ObjectiveOutput, PairBatch, register_objective
from .transforms import batch_mean, log1mexp


@register_objective("orpo", needs_reference=False)
def orpo(batch: PairBatch, *, beta):
    """NLL − β·log σ(log-odds), log-odds = (ℓ̄_w − ℓ̄_l) − (log(1 − e^{ℓ̄_w}) − log(1 − e^{ℓ̄_l}))
    with ℓ̄ = ℓ/n.  A pair with an empty response (n = 0: it has no odds) gets no odds-ratio
    term (0, no gradient).  ℓ̄ is clamped to ≤ −1e-30 so a response of probability 1 gives a
    finite value (and no gradient); fp32 and fp64 both hold that bound, so the clamped value
    is the same in either.  Rewards β·ℓ̄; metrics ``log_odds_ratio`` (mean log σ(log-odds)),
    ``log_odds_chosen`` (mean log-odds) and ``nll_loss``."""
    chosen = batch.average("chosen")
    rejected = batch.average("rejected")
    top = -1e-30  # not finfo.tiny: log(tiny) is −87 in fp32 and −708 in fp64
    log_odds = (chosen - rejected) - (log1mexp(chosen.clamp(max=top)) - log1mexp(rejected.clamp(max=top)))
    has_odds = (batch.lengths("chosen") > 0) & (batch.lengths("rejected") > 0)
    zero = torch.zeros((), dtype=log_odds.dtype, device=log_odds.device)
    log_odds = torch.where(has_odds, log_odds, zero)
    ratio = torch.where(has_odds, F.logsigmoid(log_odds), zero)
    nll = batch.nll()
    metrics = {"log_odds_ratio": batch_mean(ratio), "log_odds_chosen": batch_mean(log_odds), "nll_loss": nll}
    return ObjectiveOutput(nll - beta * ratio, beta * chosen, beta * rejected, metrics)
