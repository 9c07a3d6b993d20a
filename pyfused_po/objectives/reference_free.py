"""Reference-free losses of TRL's CPOTrainer: CPO, SimPO, AlphaPO.

Each adds ``cpo_alpha`` × the batch token-mean NLL of the chosen responses (TRL's
``loss = losses.mean() + cpo_alpha * nll_loss``), spread evenly over the pairs.
"""
import torch

from .checks import check_number, check_range
from .registry import ObjectiveOutput, PairBatch, register_objective
from .transforms import smoothed_sigmoid_loss


def _with_nll(batch, losses, chosen_rewards, rejected_rewards, cpo_alpha):
    metrics = {}
    if cpo_alpha != 0:
        nll = batch.nll()
        losses = losses + cpo_alpha * nll
        metrics["nll_loss"] = nll
    return ObjectiveOutput(losses, chosen_rewards, rejected_rewards, metrics)


def _check_cpo(*, beta, label_smoothing, cpo_alpha, **others):
    check_range("label_smoothing", label_smoothing, 0.0, 0.5)
    check_number("cpo_alpha", cpo_alpha)
    if "simpo_gamma" in others:
        check_number("simpo_gamma", others["simpo_gamma"])
    if "alpha" in others:
        check_number("alpha", others["alpha"])


@register_objective("cpo", needs_reference=False, check=_check_cpo,
                    hyperparameters={"label_smoothing": 0.0, "cpo_alpha": 1.0})
def cpo(batch: PairBatch, *, beta, label_smoothing, cpo_alpha):
    """CPO (Xu et al., 2024): −(1−ε)·log σ(β(ℓ_w − ℓ_l)) − ε·log σ(−β(ℓ_w − ℓ_l)) + α_cpo·NLL.
    Rewards β·ℓ."""
    x = beta * (batch.chosen_logps - batch.rejected_logps)
    return _with_nll(batch, smoothed_sigmoid_loss(x, label_smoothing), beta * batch.chosen_logps,
                     beta * batch.rejected_logps, cpo_alpha)


@register_objective("simpo", needs_reference=False, check=_check_cpo,
                    hyperparameters={"simpo_gamma": 0.5, "label_smoothing": 0.0, "cpo_alpha": 0.0})
def simpo(batch: PairBatch, *, beta, simpo_gamma, label_smoothing, cpo_alpha):
    """SimPO (Meng et al., 2024): x = β(ℓ_w/n_w − ℓ_l/n_l) − γ; −(1−ε)·log σ(x) − ε·log σ(−x)
    (+ α_cpo·NLL for CPO-SimPO).  Rewards β·ℓ/n."""
    chosen, rejected = batch.average("chosen"), batch.average("rejected")
    x = beta * (chosen - rejected) - simpo_gamma
    return _with_nll(batch, smoothed_sigmoid_loss(x, label_smoothing), beta * chosen, beta * rejected,
                     cpo_alpha)


def alphapo_reward(avg_logps, alpha):
    """u = (1 − e^{−α·ℓ̄})/α = (1 − p̄^{−α})/α, with the limit u = ℓ̄ at α = 0."""
    if alpha == 0:
        return avg_logps
    return -torch.expm1(-alpha * avg_logps) / alpha


@register_objective("alphapo", needs_reference=False, check=_check_cpo,
                    hyperparameters={"alpha": 0.0, "simpo_gamma": 0.5, "label_smoothing": 0.0,
                                     "cpo_alpha": 0.0})
def alphapo(batch: PairBatch, *, beta, alpha, simpo_gamma, label_smoothing, cpo_alpha):
    """AlphaPO (Gupta et al., 2025): SimPO on the rewards u = (1 − e^{−α·ℓ̄})/α of the
    length-averaged log-probs ℓ̄: x = β(u_w − u_l) − γ.  Rewards β·u."""
    chosen = alphapo_reward(batch.average("chosen"), alpha)
    rejected = alphapo_reward(batch.average("rejected"), alpha)
    x = beta * (chosen - rejected) - simpo_gamma
    return _with_nll(batch, smoothed_sigmoid_loss(x, label_smoothing), beta * chosen, beta * rejected,
                     cpo_alpha)
