"""Sequence stage: per-token values → per-sequence sums and lengths (O(N), plain torch).

Batches of pairs are laid out ``[chosen; rejected]`` along dim 0.
"""
from typing import NamedTuple, Optional

import torch


class SequenceSums(NamedTuple):
    """``logps``: Σ_t w_t · logp_t over labelled tokens; ``lengths``: their count (float32)."""

    logps: torch.Tensor
    lengths: torch.Tensor


def label_mask(labels, *, ignore_index=-100, shift=False):
    """True where a token contributes: its label is not ignored (and, with shift, t ≥ 1)."""
    mask = labels != ignore_index
    if shift:
        mask = mask.clone()
        mask[..., 0] = False
    return mask


def sequence_sums(token_values, labels, *, ignore_index=-100, shift=False,
                  token_weights: Optional[torch.Tensor] = None):
    """Sums ``token_values`` (0 where ignored, as the token stage returns them) over the
    last dimension, optionally weighted per token, and counts the labelled tokens."""
    mask = label_mask(labels, ignore_index=ignore_index, shift=shift)
    values = token_values if token_weights is None else token_values * token_weights
    values = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return SequenceSums(values.sum(-1), mask.sum(-1).to(torch.float32))


def masked_mean(token_values, mask):
    """Mean of ``token_values`` over the True entries of ``mask`` (0 when there are none)."""
    total = torch.where(mask, token_values, torch.zeros((), dtype=token_values.dtype,
                                                        device=token_values.device)).sum()
    return total / mask.sum().clamp(min=1)


def split_pairs(x):
    """``[chosen; rejected]`` → ``(chosen, rejected)`` along dim 0."""
    if x.shape[0] % 2:
        raise ValueError(
            f"a paired batch is laid out [chosen; rejected] along dim 0 and needs an even size, "
            f"got {x.shape[0]}"
        )
    half = x.shape[0] // 2
    return x[:half], x[half:]
