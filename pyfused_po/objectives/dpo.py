"""DPO (Rafailov et al., 2023) and conservative DPO (label smoothing)."""
import torch.nn.functional as F

from .registry import ObjectiveOutput, PairBatch, register_objective


def _check_label_smoothing(*, beta, label_smoothing):
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing!r}")


@register_objective("sigmoid", hyperparameters={"label_smoothing": 0.0}, check=_check_label_smoothing)
def sigmoid(batch: PairBatch, *, beta, label_smoothing):
    """−(1−ε)·log σ(β·h) − ε·log σ(−β·h),  h = (ℓ_w − ℓʳ_w) − (ℓ_l − ℓʳ_l)."""
    chosen = batch.chosen_logps - batch.ref_chosen_logps
    rejected = batch.rejected_logps - batch.ref_rejected_logps
    h = beta * (chosen - rejected)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return ObjectiveOutput(losses, beta * chosen, beta * rejected)
