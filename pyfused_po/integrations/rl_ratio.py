"""Importance ratio between the trainer and the sampler, for GRPO / RLOO-style trainers.

A rollout engine (vLLM, SGLang) samples token ``y_t`` from ``π_s`` and reports ``log π_s(y_t)``;
the trainer scores the same token under its own weights as ``log π_t(y_t)`` — with
:func:`pyfused_po.integrations.rl.rl_token_logprobs` and the sampler's ``temperature`` / ``top_k``
/ ``top_p`` / ``min_p``, so that both are log-probs of the same truncated distribution.  The two
still differ (kernels, precision, batch composition, weights that moved), and the policy gradient is
only unbiased once the samples are reweighted by ``r_t = π_t(y_t) / π_s(y_t)``.
"""
from typing import Dict, NamedTuple, Optional

import torch


class ImportanceRatio(NamedTuple):
    """Per-token ``ratio`` and ``weight`` (shaped like the inputs) and scalar ``metrics``."""

    ratio: torch.Tensor
    weight: torch.Tensor
    metrics: Dict[str, torch.Tensor]


def importance_ratio(trainer_logps, sampler_logps, *, mask=None, cap: Optional[float] = 2.0) -> ImportanceRatio:
    """Per-token ratio, truncated-importance-sampling weight and mismatch metrics.

    With ``ℓ_t = log π_t(y_t) − log π_s(y_t)`` over the tokens of ``mask`` (all tokens without one):

    * ``ratio = exp(ℓ_t)`` — 0 where the trainer's log-prob is ``−inf`` (the token lies outside the
      trainer's kept set, e.g. the sampler's top-p nucleus moved);
    * ``weight = min(ratio, cap)`` detached (truncated importance sampling: the weight rescales the
      policy-gradient term and gets no gradient itself; ``cap=None`` leaves it uncapped);
    * ``metrics`` (scalars, detached), over the masked tokens whose trainer log-prob is finite:
      ``kl_k1 = mean(−ℓ)`` and ``kl_k3 = mean(r − 1 − ℓ)`` (two estimates of ``KL(π_s ‖ π_t)`` from
      the sampler's own samples; k3 is non-negative per token), ``max_ratio``, ``min_ratio``,
      ``mean_abs_log_ratio``; over all masked tokens: ``frac_outside`` (trainer log-prob ``−inf``) and
      ``frac_capped`` (``ratio > cap``).

    Arguments are float tensors of one shape; ``mask`` bool (or 0/1) of that shape.  The sampler's
    log-prob must be finite wherever ``mask`` is set (it sampled the token); otherwise ``ValueError``.
    """
    if not isinstance(trainer_logps, torch.Tensor) or not isinstance(sampler_logps, torch.Tensor):
        raise TypeError("trainer_logps and sampler_logps must be torch tensors")
    if trainer_logps.shape != sampler_logps.shape:
        raise ValueError(f"trainer_logps and sampler_logps must have one shape, got {tuple(trainer_logps.shape)} "
                         f"and {tuple(sampler_logps.shape)}")
    if mask is None:
        mask = torch.ones(trainer_logps.shape, dtype=torch.bool, device=trainer_logps.device)
    elif mask.shape != trainer_logps.shape:
        raise ValueError(f"mask must have the shape of the log-probs {tuple(trainer_logps.shape)}, "
                         f"got {tuple(mask.shape)}")
    mask = mask.bool()
    if cap is not None and not cap > 0:
        raise ValueError(f"cap must be None or a number > 0, got {cap!r}")
    t, s = trainer_logps.detach().float(), sampler_logps.detach().float()
    if bool((mask & ~torch.isfinite(s)).any()):
        raise ValueError("sampler_logps must be finite on every masked token (the sampler drew it); "
                         "got -inf/nan: was the token scored under another truncation?")
    inside = mask & torch.isfinite(t)
    log_ratio = torch.where(inside, t - s, torch.zeros_like(t))
    ratio = torch.where(inside, log_ratio.exp(), torch.zeros_like(t))
    weight = ratio if cap is None else ratio.clamp(max=cap)

    def mean(x, where):
        return (x * where).sum() / where.sum().clamp(min=1)

    capped = torch.zeros_like(mask) if cap is None else (ratio > cap) & mask
    finite_ratio = torch.where(inside, ratio, torch.full_like(ratio, float("nan")))
    metrics = {
        "kl_k1": mean(-log_ratio, inside),
        "kl_k3": mean(ratio - 1.0 - log_ratio, inside),
        "max_ratio": finite_ratio.nan_to_num(-float("inf")).max() if bool(inside.any()) else ratio.new_tensor(1.0),
        "min_ratio": finite_ratio.nan_to_num(float("inf")).min() if bool(inside.any()) else ratio.new_tensor(1.0),
        "mean_abs_log_ratio": mean(log_ratio.abs(), inside),
        "frac_outside": mean((mask & ~inside).float(), mask),
        "frac_capped": mean(capped.float(), mask),
    }
    return ImportanceRatio(ratio * mask, weight * mask, metrics)
