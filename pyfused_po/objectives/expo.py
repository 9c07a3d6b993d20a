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
``batch.rejected_kl`` (``[P]`` each).  :func:`expo_loss` (from per-sequence values) and
:func:`expo_from_logits` (from policy and reference logits, one pass each way) supply
them without any change elsewhere.
"""
import torch
import torch.nn.functional as F

from .registry import ObjectiveOutput, PairBatch, register_objective


def _check_expo(*, beta, expo_lambda):
    del beta  # EXPO has no β; the registry passes it to every loss
    if (isinstance(expo_lambda, bool) or not isinstance(expo_lambda, (int, float))
            or not (0.0 <= float(expo_lambda) < float("inf"))):
        raise ValueError(f"expo_lambda must be a finite number >= 0, got {expo_lambda!r}")


def _pair_kl(batch: PairBatch, expo_lambda):
    """½(KL_w + KL_l), or None when λ = 0 and the KL was not supplied."""
    chosen_kl = getattr(batch, "chosen_kl", None)
    rejected_kl = getattr(batch, "rejected_kl", None)
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
    metrics = {"expo/bt_loss": bt.detach().mean()}
    losses = bt
    kl = _pair_kl(batch, expo_lambda)
    if kl is not None:
        losses = bt + expo_lambda * kl
        metrics["expo/kl"] = kl.detach().mean()
    return ObjectiveOutput(losses, batch.chosen_logps, batch.rejected_logps, metrics)


def _pair_tensor(name, x, like):
    from ..validation import check_tensor

    check_tensor(name, x, floating=True)
    if tuple(x.shape) != tuple(like.shape):
        raise ValueError(f"{name} must have shape {tuple(like.shape)} (one value per pair, like "
                         f"chosen_logps), got {tuple(x.shape)}")


def expo_loss(chosen_logps, rejected_logps, chosen_kl, rejected_kl, *, expo_lambda=1.0,
              reduction="mean"):
    """EXPO from per-sequence values (each ``[P]``).

    Args:
        chosen_logps, rejected_logps: summed policy log-probs of each pair's responses.
        chosen_kl, rejected_kl: summed per-token KL(π_ref ‖ π_θ) along each response.
        expo_lambda: weight λ ≥ 0 of the KL term.
        reduction: ``"mean"`` over pairs, ``"sum"`` or ``"none"``.

    Returns:
        :class:`pyfused_po.preference_loss.PreferenceLossOutput` with TRL-style metrics
        (rewards are the policy log-probs) plus ``expo/bt_loss`` and ``expo/kl``.
    """
    from ..preference_loss import REDUCTIONS, PreferenceLossOutput
    from ..validation import check_same_device, check_tensor

    _check_expo(beta=None, expo_lambda=expo_lambda)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_tensor("chosen_logps", chosen_logps, floating=True)
    if chosen_logps.dim() != 1:
        raise ValueError(f"chosen_logps must be 1-D [pairs], got shape {tuple(chosen_logps.shape)}")
    for name, x in (("rejected_logps", rejected_logps), ("chosen_kl", chosen_kl),
                    ("rejected_kl", rejected_kl)):
        _pair_tensor(name, x, chosen_logps)
    check_same_device(chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                      chosen_kl=chosen_kl, rejected_kl=rejected_kl)
    wide = torch.float64 if chosen_logps.dtype == torch.float64 else torch.float32
    batch = PairBatch(chosen_logps.to(wide), rejected_logps.to(wide))
    # Set as attributes so this works before and after PairBatch grows the two fields.
    batch.chosen_kl, batch.rejected_kl = chosen_kl.to(wide), rejected_kl.to(wide)
    out = expo(batch, beta=None, expo_lambda=expo_lambda)
    losses = out.losses
    if reduction == "mean":
        loss = losses.sum() / max(losses.numel(), 1)
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses
    chosen_rewards, rejected_rewards = out.chosen_rewards.detach(), out.rejected_rewards.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(wide).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_rewards.mean(),
        "logps/rejected": rejected_rewards.mean(),
        **out.metrics,
    }
    return PreferenceLossOutput(loss, losses, metrics, chosen_rewards, rejected_rewards)


def expo_from_logits(logits, ref_logits, labels, *, expo_lambda=1.0, ignore_index=-100, shift=False,
                     temperature=1.0, logit_scale=1.0, softcap=None, backend="auto", reduction="mean"):
    """EXPO straight from policy and reference logits, for a batch laid out ``[chosen; rejected]``.

    One fused pass reads each policy row with its reference row and returns both the
    per-token KL and the policy's log p(label) (:func:`pyfused_po.token_kl.token_kl` with
    ``with_logps=True``); one backward pass writes the policy logits' gradient.  The
    reference gets no gradient.

    Args:
        logits, ref_logits: ``[2P, T, V]`` policy and reference logits.
        labels: ``[2P, T]``; ``ignore_index`` marks prompt and padding tokens.
        expo_lambda, reduction: as :func:`expo_loss`.
        ignore_index, shift, temperature, logit_scale, softcap, backend: as
            :func:`pyfused_po.token_logprobs` (the transform applies to both models).
    """
    from ..sequence import sequence_sums, split_pairs
    from ..token_kl import token_kl
    from ..validation import check_tensor

    _check_expo(beta=None, expo_lambda=expo_lambda)
    check_tensor("labels", labels, floating=False)
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, seq] with the batch laid out [chosen; rejected], "
                         f"got shape {tuple(labels.shape)}")
    split_pairs(labels)  # raises on an odd batch
    out = token_kl(logits, ref_logits, labels, ignore_index=ignore_index, shift=shift,
                   temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                   backend=backend, with_logps=True)
    mask_kwargs = dict(ignore_index=ignore_index, shift=shift)
    logps = sequence_sums(out.logps, labels, **mask_kwargs).logps
    kls = sequence_sums(out.kl, labels, **mask_kwargs).logps
    chosen_logps, rejected_logps = split_pairs(logps)
    chosen_kl, rejected_kl = split_pairs(kls)
    return expo_loss(chosen_logps, rejected_logps, chosen_kl, rejected_kl,
                     expo_lambda=expo_lambda, reduction=reduction)
