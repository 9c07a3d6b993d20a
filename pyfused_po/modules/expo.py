"""EXPO's user-facing entry points (the objective itself is :mod:`pyfused_po.objectives.expo`).

``expo_loss`` runs the objective stage on per-sequence values; ``expo_from_logits`` runs all
three stages through :class:`~pyfused_po.FusedPreferenceLoss`.  They live above the module
stage so that the objective registry never imports the stages built on top of it.
"""
from .preference import FusedPreferenceLoss
from ..objectives.preference_loss import preference_loss


def expo_loss(chosen_logps, rejected_logps, chosen_kl, rejected_kl, *, expo_lambda=1.0,
              reduction="mean"):
    """EXPO from per-sequence values (each ``[P]``): ``preference_loss(loss_type="expo")``.

    Args:
        chosen_logps, rejected_logps: summed policy log-probs of each pair's responses.
        chosen_kl, rejected_kl: summed per-token KL(π_ref ‖ π_θ) along each response.
        expo_lambda: weight λ ≥ 0 of the KL term.
        reduction: ``"mean"`` over pairs, ``"sum"`` or ``"none"``.

    Returns:
        :class:`pyfused_po.objectives.preference_loss.PreferenceLossOutput` with TRL-style metrics
        (rewards are the policy log-probs) plus ``expo/bt_loss`` and ``expo/kl``.
    """
    return preference_loss(chosen_logps, rejected_logps, loss_type="expo", chosen_kl=chosen_kl,
                           rejected_kl=rejected_kl, expo_lambda=expo_lambda, reduction=reduction)


def expo_from_logits(logits, ref_logits, labels, *, expo_lambda=1.0, ignore_index=-100, shift=False,
                     temperature=1.0, logit_scale=1.0, softcap=None, backend="auto", reduction="mean"):
    """EXPO straight from policy and reference logits, for a batch laid out ``[chosen; rejected]``.

    One fused pass reads each policy row with its reference row and returns both the
    per-token KL and the policy's log p(label) (:func:`pyfused_po.token.token_kl.token_kl` with
    ``with_logps=True``); one backward pass writes the policy logits' gradient.  The
    reference gets no gradient.  The same as ``FusedPreferenceLoss("expo", ...)``.

    Args:
        logits, ref_logits: ``[2P, T, V]`` policy and reference logits.
        labels: ``[2P, T]``; ``ignore_index`` marks prompt and padding tokens.
        expo_lambda, reduction: as :func:`expo_loss`.
        ignore_index, shift, temperature, logit_scale, softcap, backend: as
            :func:`pyfused_po.token_logprobs` (the transform applies to both models).
    """
    module = FusedPreferenceLoss("expo", expo_lambda=expo_lambda, ignore_index=ignore_index, shift=shift,
                                 temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                                 backend=backend, reduction=reduction)
    return module(logits=logits, labels=labels, ref_logits=ref_logits)
