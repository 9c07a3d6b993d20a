"""EXPO (Hu, Kong, He & Wipf, "Explicit Preference Optimization: No Need for an Implicit
Reward Model", ICML 2025, arXiv:2506.07492): the composite objective.

Per pair, with ℓ_w, ℓ_l the summed policy log-probs and KL_w, KL_l the per-sequence sums
of the token-level full-vocabulary KL(π_ref ‖ π_θ) along each response's tokens
(:func:`pyfused_po.token.token_kl.token_kl`, summed by the sequence stage):

    loss = −log σ(ℓ_w − ℓ_l)  +  λ · ½ (KL_w + KL_l)

The Bradley–Terry term uses the policy alone (no β, no reference log-probs).  The KL
term estimates the per-prompt E_x KL(π_ref(·|x) ‖ π_θ(·|x)); both responses of a pair
share the prompt, so their two sequence KLs are averaged (a single estimate per prompt,
so that λ keeps its meaning whatever the number of responses).  ``expo_lambda = 0``
gives the plain Bradley–Terry loss and needs no KL.

The paper's regression variant is not provided (its exact form could not be verified).

How the KL reaches the objective: the registered ``expo`` reads ``batch.chosen_kl`` and
``batch.rejected_kl`` (``[P]`` each), which ``preference_loss`` takes as ``chosen_kl=`` /
``rejected_kl=`` and ``FusedPreferenceLoss("expo")`` computes with the KL kernel in the
same pass as the policy log-probs.  The user-facing ``expo_loss`` and ``expo_from_logits``
are in :mod:`pyfused_po.modules.expo` (they call the higher stages: this file is the objective only).
"""
import torch.nn.functional as F

from .registry import ObjectiveOutput, PairBatch, register_objective
from .transforms import batch_mean


def _check_expo(*, beta, expo_lambda):
    del beta  # EXPO has no β; the registry passes it to every loss
    if (isinstance(expo_lambda, bool) or not isinstance(expo_lambda, (int, float))
            or not (0.0 <= float(expo_lambda) < float("inf"))):
        raise ValueError(f"expo_lambda must be a finite number >= 0, got {expo_lambda!r}")


def _pair_kl(batch: PairBatch, expo_lambda):
    """½(KL_w + KL_l), or None when λ = 0 and the KL was not supplied."""
    chosen_kl, rejected_kl = batch.chosen_kl, batch.rejected_kl
    if chosen_kl is None or rejected_kl is None:
        if expo_lambda == 0:
            return None
        raise ValueError(
            "loss_type='expo' with expo_lambda > 0 needs chosen_kl and rejected_kl: the summed "
            "per-token KL(π_ref ‖ π_θ) of each response (pyfused_po.token_kl); or use "
            "expo_from_logits(logits, ref_logits, labels) / expo_loss(...)"
        )
    return 0.5 * (chosen_kl + rejected_kl)


@register_objective("expo", needs_reference=False, hyperparameters={"expo_lambda": 1.0}, check=_check_expo)
def expo(batch: PairBatch, *, beta, expo_lambda):
    """−log σ(ℓ_w − ℓ_l) + λ·½(KL_w + KL_l); rewards are the policy log-probs ℓ_w, ℓ_l."""
    del beta
    bt = -F.logsigmoid(batch.chosen_logps - batch.rejected_logps)
    metrics = {"expo/bt_loss": batch_mean(bt.detach())}
    losses = bt
    kl = _pair_kl(batch, expo_lambda)
    if kl is not None:
        losses = bt + expo_lambda * kl
        metrics["expo/kl"] = batch_mean(kl.detach())
    return ObjectiveOutput(losses, batch.chosen_logps, batch.rejected_logps, metrics)
