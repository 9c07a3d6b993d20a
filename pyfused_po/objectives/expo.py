"""EXPO (Hu, Kong, He & Wipf, "Explicit Preference Optimization: No Need for an Implicit
Reward Model", ICML 2025, arXiv:2506.07492): the composite objective.

Per pair, with ℓ_w, ℓ_l the summed policy log-probs and KL_w, KL_l the per-sequence sums
of the token-level full-vocabulary KL(π_ref ‖ π_θ) along each response's tokens
(:func:`pyfused_po.token_kl.token_kl`, summed by the sequence stage):

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
same pass as the policy log-probs.
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


def expo_loss(chosen_logps, rejected_logps, chosen_kl, rejected_kl, *, expo_lambda=1.0,
              reduction="mean"):
    """EXPO from per-sequence values (each ``[P]``): ``preference_loss(loss_type="expo")``.

    Args:
        chosen_logps, rejected_logps: summed policy log-probs of each pair's responses.
        chosen_kl, rejected_kl: summed per-token KL(π_ref ‖ π_θ) along each response.
        expo_lambda: weight λ ≥ 0 of the KL term.
        reduction: ``"mean"`` over pairs, ``"sum"`` or ``"none"``.

    Returns:
        :class:`pyfused_po.preference_loss.PreferenceLossOutput` with TRL-style metrics
        (rewards are the policy log-probs) plus ``expo/bt_loss`` and ``expo/kl``.
    """
    from ..preference_loss import preference_loss

    return preference_loss(chosen_logps, rejected_logps, loss_type="expo", chosen_kl=chosen_kl,
                           rejected_kl=rejected_kl, expo_lambda=expo_lambda, reduction=reduction)


def expo_from_logits(logits, ref_logits, labels, *, expo_lambda=1.0, ignore_index=-100, shift=False,
                     temperature=1.0, logit_scale=1.0, softcap=None, backend="auto", reduction="mean"):
    """EXPO straight from policy and reference logits, for a batch laid out ``[chosen; rejected]``.

    One fused pass reads each policy row with its reference row and returns both the
    per-token KL and the policy's log p(label) (:func:`pyfused_po.token_kl.token_kl` with
    ``with_logps=True``); one backward pass writes the policy logits' gradient.  The
    reference gets no gradient.  The same as ``FusedPreferenceLoss("expo", ...)``.

    Args:
        logits, ref_logits: ``[2P, T, V]`` policy and reference logits.
        labels: ``[2P, T]``; ``ignore_index`` marks prompt and padding tokens.
        expo_lambda, reduction: as :func:`expo_loss`.
        ignore_index, shift, temperature, logit_scale, softcap, backend: as
            :func:`pyfused_po.token_logprobs` (the transform applies to both models).
    """
    from ..module import FusedPreferenceLoss

    module = FusedPreferenceLoss("expo", expo_lambda=expo_lambda, ignore_index=ignore_index, shift=shift,
                                 temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                                 backend=backend, reduction=reduction)
    return module(logits=logits, labels=labels, ref_logits=ref_logits)
