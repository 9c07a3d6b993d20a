"""DPO (Rafailov et al., 2023) and the variants of its Bradley–Terry margin, in TRL v1 form.

Notation: s_w, s_l are the f-divergence scores of the log-ratios r = ℓ − ℓʳ
(s = r for the default reverse KL), h = s_w − s_l.  Rewards are β·r as TRL logs them.
"""
import torch
import torch.nn.functional as F

from .checks import check_range
from .registry import ObjectiveOutput, PairBatch, register_objective
from .transforms import smoothed_sigmoid_loss, weighted_log


def _dpo_rewards(batch, beta):
    chosen, rejected = batch.logratios()
    return beta * chosen, beta * rejected


def _check_label_smoothing(*, beta, label_smoothing):
    check_range("label_smoothing", label_smoothing, 0.0, 0.5)


@register_objective("sigmoid", hyperparameters={"label_smoothing": 0.0}, check=_check_label_smoothing,
                    uses_f_divergence=True)
def sigmoid(batch: PairBatch, *, beta, label_smoothing):
    """−(1−ε)·log σ(β·h) − ε·log σ(−β·h) (cDPO when ε > 0)."""
    chosen, rejected = batch.scores()
    return ObjectiveOutput(smoothed_sigmoid_loss(beta * (chosen - rejected), label_smoothing),
                           *_dpo_rewards(batch, beta))


@register_objective("hinge", uses_f_divergence=True)
def hinge(batch: PairBatch, *, beta):
    """max(0, 1 − β·h) (SLiC)."""
    chosen, rejected = batch.scores()
    return ObjectiveOutput(torch.relu(1.0 - beta * (chosen - rejected)), *_dpo_rewards(batch, beta))


@register_objective("ipo", uses_f_divergence=True)
def ipo(batch: PairBatch, *, beta):
    """(s_w/n_w − s_l/n_l − 1/(2β))²: IPO with each side divided by its own length (n ≥ 1)."""
    chosen, rejected = batch.scores()
    delta = chosen / batch.lengths("chosen").clamp(min=1.0) - rejected / batch.lengths("rejected").clamp(min=1.0)
    return ObjectiveOutput((delta - 1.0 / (2.0 * beta)) ** 2, *_dpo_rewards(batch, beta))


@register_objective("sigmoid_norm", uses_f_divergence=True)
def sigmoid_norm(batch: PairBatch, *, beta):
    """−log σ(β·(s_w/n_w − s_l/n_l)): DPO on length-averaged scores (n ≥ 1)."""
    chosen, rejected = batch.scores()
    delta = chosen / batch.lengths("chosen").clamp(min=1.0) - rejected / batch.lengths("rejected").clamp(min=1.0)
    return ObjectiveOutput(-F.logsigmoid(beta * delta), *_dpo_rewards(batch, beta))


def _check_robust(*, beta, label_smoothing):
    check_range("label_smoothing", label_smoothing, 0.0, 0.5, high_open=True)


@register_objective("robust", hyperparameters={"label_smoothing": 0.0}, check=_check_robust,
                    uses_f_divergence=True)
def robust(batch: PairBatch, *, beta, label_smoothing):
    """rDPO (Chowdhury et al., 2024): (−(1−ε)·log σ(βh) + ε·log σ(−βh)) / (1 − 2ε),
    an unbiased loss under labels flipped with probability ε."""
    chosen, rejected = batch.scores()
    x = beta * (chosen - rejected)
    losses = (-weighted_log(1.0 - label_smoothing, F.logsigmoid(x)) + weighted_log(label_smoothing, F.logsigmoid(-x))) \
        / (1.0 - 2.0 * label_smoothing)
    return ObjectiveOutput(losses, *_dpo_rewards(batch, beta))


def _check_exo(*, beta, label_smoothing):
    check_range("label_smoothing", label_smoothing, 0.0, 1.0, low_open=True, high_open=True)


@register_objective("exo_pair", hyperparameters={"label_smoothing": 1e-3}, check=_check_exo,
                    uses_f_divergence=True)
def exo_pair(batch: PairBatch, *, beta, label_smoothing):
    """EXO-pref (Ji et al., 2024, Eq. 16): KL(q ‖ p) between q = (σ(βh), σ(−βh)) and the
    smoothed labels p = (1−ε, ε); ε must be in (0, 1) (default 1e-3, as TRL uses)."""
    chosen, rejected = batch.scores()
    x = beta * (chosen - rejected)
    eps = torch.as_tensor(label_smoothing, dtype=x.dtype, device=x.device)
    # q·(log q − log p) per outcome, 0 where q = 0 (an infinite margin), not 0·(−∞).
    losses = (weighted_log(torch.sigmoid(x), F.logsigmoid(x) - torch.log1p(-eps))
              + weighted_log(torch.sigmoid(-x), F.logsigmoid(-x) - torch.log(eps)))
    return ObjectiveOutput(losses, *_dpo_rewards(batch, beta))


def _check_hdpo(*, beta, hdpo_alpha):
    check_range("hdpo_alpha", hdpo_alpha, 0.0, float("inf"), low_open=True, high_open=True)


@register_objective("hdpo", hyperparameters={"hdpo_alpha": 1.0}, check=_check_hdpo)
def hdpo(batch: PairBatch, *, beta, hdpo_alpha):
    """H-DPO (Omura et al., 2024): −log σ(β[α(ℓ_w − ℓ_l) − (ℓʳ_w − ℓʳ_l)]); α < 1 sharpens
    the policy's entropy, α = 1 is DPO.  Rewards β(α·ℓ − ℓʳ)."""
    chosen = hdpo_alpha * batch.chosen_logps - batch.ref_chosen_logps
    rejected = hdpo_alpha * batch.rejected_logps - batch.ref_rejected_logps
    return ObjectiveOutput(-F.logsigmoid(beta * (chosen - rejected)), beta * chosen, beta * rejected)
