"""Per-response pairwise losses from TRL's DPOTrainer: NCA, BCO, SPPO (hard), DiscoPOP.

s_w, s_l: f-divergence scores of the log-ratios (s = ℓ − ℓʳ by default); rewards β·(ℓ − ℓʳ).
"""
import torch
import torch.nn.functional as F

from .checks import check_number
from .registry import ObjectiveOutput, PairBatch, register_objective


def _dpo_rewards(batch, beta):
    chosen, rejected = batch.logratios()
    return beta * chosen, beta * rejected


@register_objective("nca_pair", uses_f_divergence=True)
def nca_pair(batch: PairBatch, *, beta):
    """NCA (Chen et al., 2024): −log σ(βs_w) − ½·log σ(−βs_w) − ½·log σ(−βs_l)."""
    chosen, rejected = batch.scores()
    losses = (-F.logsigmoid(beta * chosen) - 0.5 * F.logsigmoid(-beta * chosen)
              - 0.5 * F.logsigmoid(-beta * rejected))
    return ObjectiveOutput(losses, *_dpo_rewards(batch, beta))


def _check_bco(*, beta, bco_delta):
    if isinstance(bco_delta, torch.Tensor):
        if bco_delta.numel() != 1:
            raise ValueError(f"bco_delta must be a number or a one-element tensor, got shape "
                             f"{tuple(bco_delta.shape)}")
        return
    check_number("bco_delta", bco_delta)


@register_objective("bco_pair", hyperparameters={"bco_delta": 0.0}, check=_check_bco,
                    uses_f_divergence=True)
def bco_pair(batch: PairBatch, *, beta, bco_delta):
    """BCO (Jung et al., 2024), paired: −log σ(βs_w − δ) − log σ(−(βs_l − δ)).

    δ is the running mean of the rewards β·s over training.  TRL v1 sets δ = 0 (the
    default here); TRL 0.x kept a running mean over every reward seen.  Pass it as
    ``bco_delta`` (a number or a one-element tensor, treated as a constant), or let
    :class:`~pyfused_po.FusedPreferenceLoss` keep it (``bco_running_mean=True``)."""
    chosen, rejected = batch.scores()
    delta = torch.as_tensor(bco_delta, dtype=chosen.dtype, device=chosen.device).detach().reshape(())
    losses = -F.logsigmoid(beta * chosen - delta) - F.logsigmoid(-(beta * rejected - delta))
    return ObjectiveOutput(losses, *_dpo_rewards(batch, beta), {"bco_delta": delta})


@register_objective("sppo_hard", uses_f_divergence=True)
def sppo_hard(batch: PairBatch, *, beta):
    """SPPO with hard labels (Wu et al., 2024): (s_w − 1/(2β))² + (s_l + 1/(2β))²."""
    chosen, rejected = batch.scores()
    losses = (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    return ObjectiveOutput(losses, *_dpo_rewards(batch, beta))


def _check_discopop(*, beta, discopop_tau):
    check_number("discopop_tau", discopop_tau, positive=True)


@register_objective("discopop", hyperparameters={"discopop_tau": 0.05}, check=_check_discopop,
                    uses_f_divergence=True)
def discopop(batch: PairBatch, *, beta, discopop_tau):
    """DiscoPOP (Chris Lu et al., 2024, Eq. 5), x = βh, m = σ(x/τ):
    (1 − m)·(−log σ(x)) + m·e^{−x}."""
    chosen, rejected = batch.scores()
    x = beta * (chosen - rejected)
    # m·e^{−x} = exp(log σ(x/τ) − x): finite where e^{−x} alone would overflow.
    losses = -F.logsigmoid(x) * torch.sigmoid(-x / discopop_tau) + torch.exp(F.logsigmoid(x / discopop_tau) - x)
    return ObjectiveOutput(losses, *_dpo_rewards(batch, beta))
