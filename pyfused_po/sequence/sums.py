"""Sequence stage: per-token values → per-sequence sums and lengths (O(N), plain torch).

Batches of pairs are laid out ``[chosen; rejected]`` along dim 0.
"""
from typing import NamedTuple, Optional

import torch

from .. import _dispatch
from ..compiled_checks import check_labels_agree
from ..validation import check_per_token, checked_labels


class SequenceSums(NamedTuple):
    """``logps``: Σ_t w_t · logp_t over labelled tokens; ``lengths``: their count (float32)."""

    logps: torch.Tensor
    lengths: torch.Tensor


def label_mask(labels, *, ignore_index=-100, shift=False):
    """True where a token contributes: its label is not ignored (and, with shift, t ≥ 1)."""
    mask = checked_labels("labels", labels, ignore_index) != ignore_index
    if shift and mask.shape[-1] > 0:  # T = 0: nothing to unmask
        mask = mask.clone()
        mask[..., 0] = False
    return mask


def sequence_sums(token_values, labels, *, ignore_index=-100, shift=False,
                  token_weights: Optional[torch.Tensor] = None, cu_seqlens=None, position_ids=None):
    """Sums ``token_values`` (0 where ignored, as the token stage returns them) over the
    last dimension, optionally weighted per token, and counts the labelled tokens.

    With ``cu_seqlens`` / ``position_ids`` the inputs are a packed stream ``[1, N]`` / ``[N]``
    and the sums are per packed sequence, ``[S]`` (:func:`pyfused_po.sequence.packing.packed_sequence_sums`)."""
    if cu_seqlens is not None or position_ids is not None:
        packed_sequence_sums = _dispatch.entry("packed_sequence_sums")  # pyfused_po.sequence.packing builds on this module
        return packed_sequence_sums(token_values, labels, cu_seqlens=cu_seqlens, position_ids=position_ids,
                                    ignore_index=ignore_index, shift=shift, token_weights=token_weights)
    mask = label_mask(labels, ignore_index=ignore_index, shift=shift)
    check_per_token(labels, token_values=token_values, token_weights=token_weights)
    values = token_values if token_weights is None else token_values * token_weights
    values = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return SequenceSums(values.sum(-1), mask.sum(-1).to(torch.float32))


def split_pairs(x):
    """``[chosen; rejected]`` → ``(chosen, rejected)`` along dim 0."""
    if x.shape[0] % 2:
        raise ValueError(
            f"a paired batch is laid out [chosen; rejected] along dim 0 and needs an even size, "
            f"got {x.shape[0]}"
        )
    half = x.shape[0] // 2
    return x[:half], x[half:]


def ld_token_weights(mask, ld_alpha, dtype=torch.float32):
    """LD-DPO (Liu et al., 2024) per-token weights for a ``[chosen; rejected]`` batch.

    With ``n_w``, ``n_l`` the pair's response lengths, the first ``min(n_w, n_l)`` response
    tokens of each side (counted over ``mask``) weigh 1 and the rest weigh ``ld_alpha``;
    tokens outside ``mask`` weigh 0.  Shaped like ``mask``, in ``dtype``.
    """
    position = mask.to(torch.int64).cumsum(-1)  # 1-based index among the response tokens
    chosen_len, rejected_len = split_pairs(mask.sum(-1))
    shared = torch.minimum(chosen_len, rejected_len)
    shared = torch.cat([shared, shared], dim=0).unsqueeze(-1)
    tail = torch.full(mask.shape, float(ld_alpha), dtype=dtype, device=mask.device)
    weights = torch.where(position <= shared, torch.ones_like(tail), tail)
    return torch.where(mask, weights, torch.zeros_like(weights))


def merge_labels(labels, extra_labels, *, ignore_index=-100, name="nll_labels"):
    """Labels for one token pass that serves two masks: ``labels`` where set, else
    ``extra_labels``.  Where both are set they must agree (they name the same token)."""
    labels = checked_labels("labels", labels, ignore_index)
    extra_labels = checked_labels(name, extra_labels, ignore_index)
    check_per_token(labels, floating=False, **{name: extra_labels})  # torch.where would broadcast [1, T]
    if torch.compiler.is_compiling():  # the same check, run by the compiled graph on the real tensors
        labels = check_labels_agree(labels, extra_labels, ignore_index, name)
    elif not labels.is_cuda:
        both = (labels != ignore_index) & (extra_labels != ignore_index)
        if bool((both & (labels != extra_labels)).any()):
            raise ValueError(f"{name} must equal labels wherever both are not ignore_index={ignore_index}")
    return torch.where(labels != ignore_index, labels, extra_labels)
