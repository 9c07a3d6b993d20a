"""Independent float64 references, written from the formulas (never from library code).

Every helper materializes the full float64 distribution: only for tiny test shapes.
"""
import torch


def transformed_logits(logits, *, temperature=1.0, logit_scale=1.0, softcap=None):
    z = logits.double() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def token_logprobs_ref(logits, labels, *, ignore_index=-100, shift=False, temperature=1.0,
                       logit_scale=1.0, softcap=None):
    """float64 per-token results aligned with ``labels``: dict of logps and every extra."""
    z = transformed_logits(logits, temperature=temperature, logit_scale=logit_scale, softcap=softcap)
    if shift:
        # logits at t predict the label at t+1; position 0 has no prediction.
        pad = torch.zeros_like(z[..., :1, :])
        z = torch.cat([pad, z[..., :-1, :]], dim=-2)
    valid = labels != ignore_index
    if shift:
        valid[..., 0] = False
    logq = torch.log_softmax(z, dim=-1)
    p = logq.exp()
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    out = {
        "logps": logq.gather(-1, safe.unsqueeze(-1)).squeeze(-1),
        # p·log p → 0 as p → 0 (−inf logits of a padded vocabulary); log q is made finite
        # there so that autograd does not form 0·(−inf) either.
        "entropy": -(p * torch.where(p > 0, logq, torch.zeros_like(logq))).sum(-1),
        "log_sum_sq_probs": torch.log((p * p).sum(-1)),
        "mean_logit": z.mean(-1),
        # argmax's tie rule: the lowest of several maximal ids (as HF / TRL accuracy)
        "is_top1": (z.argmax(-1) == safe).double(),
    }
    return {k: torch.where(valid, v, torch.zeros_like(v)) for k, v in out.items()}


def max_rel_err(actual, expected):
    """max |a − e| / max |e| (absolute when the expected values are all 0)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp(min=1e-30) if expected.numel() else 1.0
    return ((actual - expected).abs().max() / scale).item() if expected.numel() else 0.0
