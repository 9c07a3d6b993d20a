"""Small pieces of math shared by several objectives (all elementwise, fp32 or wider)."""
import math

import torch
import torch.nn.functional as F

F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# exp(80) ≈ 5.5e34 stays finite in fp32; TRL clamps the alpha-divergence exponent there too.
_ALPHA_EXP_MAX = 80.0


def f_divergence_scores(logratio, f_divergence_type="reverse_kl", alpha=1.0):
    """TRL's score s = f'(t) at t = π/π_ref = e^u of a log-ratio u = ℓ − ℓʳ, constant included.

    * ``reverse_kl``: s = u (standard DPO);
    * ``forward_kl``: s = 1 − e^{−u};
    * ``js_divergence``: s = log 2 + log σ(u);
    * ``alpha_divergence``: s = (e^{min((α−1)u, 80)} − 1) / (α − 1), and s = u when |α − 1| < 1e-6.

    The constant (1, log 2, −1/(α−1)) cancels in a margin s_w − s_l, but not where a side is
    used alone or divided by its own length (``ipo``, ``sigmoid_norm``: c·(1/n_w − 1/n_l)
    remains), so it is kept.  The forms are evaluated with ``expm1`` so that s stays accurate
    near u = 0 (and near α = 1, where e^{(α−1)u}/(α−1) alone would be ≈ 1/(α−1)).
    """
    if f_divergence_type == "reverse_kl":
        return logratio
    if f_divergence_type == "forward_kl":
        return -torch.expm1(-logratio)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratio)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratio
        return torch.expm1(((alpha - 1.0) * logratio).clamp(max=_ALPHA_EXP_MAX)) / (alpha - 1.0)
    raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCE_TYPES}, got {f_divergence_type!r}")


def weighted_log(weight, log_value):
    """weight · log_value, with 0 where ``weight`` is 0: a term of weight 0 is absent, so an
    infinite margin (log σ(−∞) = −∞) with ε = 0 gives its limit, not 0·(−∞) = NaN.  The
    gradient of the absent term is 0 too."""
    weight = torch.as_tensor(weight, dtype=log_value.dtype, device=log_value.device)
    # Zeroed before the product: 0·(−∞) would be NaN in the value and in both gradients.
    return weight * torch.where(weight == 0, torch.zeros_like(log_value), log_value)


def smoothed_sigmoid_loss(x, label_smoothing):
    """−(1−ε)·log σ(x) − ε·log σ(−x): the Bradley–Terry loss with soft label 1−ε."""
    return -weighted_log(1.0 - label_smoothing, F.logsigmoid(x)) - weighted_log(label_smoothing, F.logsigmoid(-x))


def log1mexp(x):
    """log(1 − eˣ) for x ≤ 0 without cancellation: log(−expm1(x)) near 0, log1p(−eˣ) far
    from it (the split at −log 2 keeps both branches accurate)."""
    near_zero = x > -math.log(2.0)
    safe_near = torch.where(near_zero, x, torch.full_like(x, -1.0))
    safe_far = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(safe_near)), torch.log1p(-torch.exp(safe_far)))


def batch_mean(x):
    """Mean over pairs; 0 (not NaN) for an empty batch, as the reduced loss is."""
    return x.sum() / max(x.numel(), 1)
