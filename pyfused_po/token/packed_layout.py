"""The packed (padding-free) token layout: one stream of ``N`` tokens, ``S`` sequences.

A packed batch holds its sequences back to back, ``[1, N]`` (or ``[N]``), delimited by
``cu_seqlens`` (int, ``[S + 1]``, ``cu_seqlens[0] = 0``, non-decreasing, ``cu_seqlens[S] = N``;
sequence ``s`` is tokens ``[cu_seqlens[s], cu_seqlens[s + 1])``), as flash-attention's varlen
kernels take it — or by ``position_ids`` restarting at 0 where each sequence starts, as
Hugging Face's padding-free collators produce.

The token stage does not care about the layout: it sees rows and labels.  The one place the
layout matters below the sequence stage is ``shift=True``, which must not cross a sequence
boundary.  It is expressed on the labels alone (an O(N) copy of integers, never of logits):
``shifted[t] = labels[t + 1]`` inside a sequence and ``ignore_index`` on each sequence's last
token, and the token stage then runs with ``shift=False`` (:func:`packed_shift`); results are
moved back to the labels' positions with :func:`packed_unshift`.

This module sits at the level of :mod:`pyfused_po.validation`: it imports nothing of the
package's stages, so the token stage may call it.
"""
import torch

from .packed_checks import checked_values
from ..validation import INT_DTYPES, check_same_device, checked_labels

LAYOUT_INT_DTYPES = tuple(d for d in INT_DTYPES if d != torch.uint8)


def _check_layout_tensor(name, x, device):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in LAYOUT_INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int32/int64), got {x.dtype}")
    if device is not None and x.device != torch.device(device):
        raise ValueError(f"{name} must be on the device of the tokens ({device}), got {x.device}")


def check_cu_seqlens(cu_seqlens, n_tokens, *, device=None, token_offset=None, name="cu_seqlens"):
    """Validated ``cu_seqlens`` as int64.

    ``n_tokens`` is the number of tokens this call holds.  Normally they are the whole stream,
    so ``cu_seqlens`` must end at ``n_tokens``; with an int ``token_offset`` (a sequence-parallel rank
    holding tokens ``[token_offset, token_offset + n_tokens)`` of a longer stream) it must end
    at or after ``token_offset + n_tokens``.  Raises ``TypeError`` / ``ValueError`` naming the
    argument before any kernel runs.
    """
    _check_layout_tensor(name, cu_seqlens, device)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be 1-D [num_sequences + 1], got shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.to(torch.int64)
    if token_offset is not None and (isinstance(token_offset, bool) or not isinstance(token_offset, int)
                                     or token_offset < 0):
        raise ValueError(f"token_offset must be an int >= 0, got {token_offset!r}")
    # Start at 0, non-decreasing, ending at N (or past the slice): packed_checks, also when compiled.
    return checked_values(cu, "cu_seqlens", name, n_tokens, -1 if token_offset is None else token_offset)


def position_ids_to_cu_seqlens(position_ids, *, name="position_ids"):
    """``cu_seqlens`` of a packed stream from its ``position_ids`` ``[1, N]`` or ``[N]``.

    A sequence starts wherever ``position_ids == 0`` (Hugging Face flash-attention varlen,
    TRL's padding-free collator); the first token must start one, and inside a sequence each
    position is the previous one + 1 (any other step is refused: Transformers' sdpa / eager
    packed mask would start a sequence there).  A host sync on CUDA (the number of sequences is data).
    """
    _check_layout_tensor(name, position_ids, None)
    if position_ids.dim() == 2 and position_ids.shape[0] != 1:
        raise ValueError(f"{name} of a packed batch must be [1, N] or [N], got shape {tuple(position_ids.shape)}")
    if position_ids.dim() not in (1, 2):
        raise ValueError(f"{name} must be [1, N] or [N], got shape {tuple(position_ids.shape)}")
    pos = position_ids.reshape(-1)
    n = pos.numel()
    if n and int(pos[0]) != 0:
        raise ValueError(f"{name} must start a sequence at the first token ({name}[0] == 0), got {int(pos[0])}")
    # Each step +1 or a restart at 0 (packed_checks.position_ids_problem), also when compiled.
    pos = checked_values(pos, "position_ids", name)
    starts = torch.nonzero(pos == 0).reshape(-1).to(torch.int64)
    return torch.cat([starts, torch.tensor([n], dtype=torch.int64, device=pos.device)])


def cu_seqlens_to_position_ids(cu_seqlens, n_tokens):
    """``position_ids`` ``[1, N]`` (0, 1, … restarting at each sequence) of a packed stream."""
    seg = segment_ids(cu_seqlens, n_tokens)
    return (torch.arange(n_tokens, device=cu_seqlens.device) - cu_seqlens[seg]).unsqueeze(0)


def resolve_cu_seqlens(labels, cu_seqlens=None, position_ids=None, *, token_offset=None):
    """The validated int64 ``cu_seqlens`` of a packed call, or ``None`` for a padded one.

    ``labels`` are the packed stream (``[1, N]`` or ``[N]``).  Exactly one layout may be
    given: ``cu_seqlens`` and ``position_ids`` together raise.
    """
    if cu_seqlens is None and position_ids is None:
        return None
    if cu_seqlens is not None and position_ids is not None:
        raise ValueError("pass one packed layout, not both: got cu_seqlens and position_ids")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() == 2 and labels.shape[0] != 1 or labels.dim() not in (1, 2):
        raise ValueError(f"packed labels must be [1, N] or [N] (sequences back to back), "
                         f"got shape {tuple(labels.shape)}")
    n = labels.numel()
    if position_ids is not None:
        cu_seqlens = position_ids_to_cu_seqlens(position_ids)
        if position_ids.numel() != n:
            raise ValueError(f"position_ids must have one entry per token like labels ({n}), "
                             f"got shape {tuple(position_ids.shape)}")
        check_same_device(position_ids=position_ids, labels=labels)
    return check_cu_seqlens(cu_seqlens, n, device=labels.device, token_offset=token_offset)


def segment_ids(cu_seqlens, n_tokens, token_offset=0):
    """``[n_tokens]`` int64: the sequence each token ``token_offset + t`` belongs to (no host sync)."""
    tokens = torch.arange(token_offset, token_offset + n_tokens, device=cu_seqlens.device)
    # The last boundary <= t names t's sequence; right=True skips empty sequences sharing it.
    return torch.searchsorted(cu_seqlens, tokens, right=True) - 1


def sequence_starts(cu_seqlens, n_tokens):
    """``[n_tokens + 1]`` bool, True at every position where a sequence starts (and at N)."""
    starts = torch.zeros(n_tokens + 1, dtype=torch.bool, device=cu_seqlens.device)
    starts[cu_seqlens] = True
    return starts


def packed_shift(x, cu_seqlens, fill):
    """``x[t + 1]`` at ``t`` inside each sequence and ``fill`` on each sequence's last token.

    ``x``: ``[1, N]`` or ``[N]`` per-token values (labels, weights, …) aligned with the input
    tokens; the result is aligned with the predicting positions, shaped like ``x``.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    if n == 0:
        return x.clone()
    last = sequence_starts(cu_seqlens, n)[1:]  # t is last in its sequence iff t + 1 starts one
    moved = torch.cat([flat[1:], flat.new_full((1,), fill)])
    return torch.where(last, flat.new_full((), fill), moved).view(x.shape)


def packed_unshift(x, cu_seqlens):
    """Inverse move of :func:`packed_shift` for results: ``x[t − 1]`` at ``t``, 0 where a
    sequence starts (that position has no prediction).  Differentiable."""
    flat = x.reshape(-1)
    n = flat.numel()
    if n == 0:
        return x
    first = sequence_starts(cu_seqlens, n)[:n]
    moved = torch.cat([flat.new_zeros((1,)), flat[:-1]])
    return torch.where(first, flat.new_zeros(()), moved).view(x.shape)


def run_packed(call, labels, *, cu_seqlens, position_ids, shift, ignore_index):
    """A token-stage entry point on a packed stream.

    ``call(labels, shift)`` runs the padded entry point; its result (a tensor or a named
    tuple of tensors shaped like ``labels``) is returned aligned with ``labels``.  Without
    ``shift`` the layout changes nothing (it is only validated); with it, the labels move
    within each sequence and the token stage runs with ``shift=False``.
    """
    # Before the shift writes ignore_index into a copy of the labels' own dtype.
    labels = checked_labels("labels", labels, ignore_index)
    cu = resolve_cu_seqlens(labels, cu_seqlens, position_ids)
    if not shift:
        return call(labels, False)
    out = call(packed_shift(labels, cu, ignore_index), False)
    if isinstance(out, torch.Tensor):
        return packed_unshift(out, cu)
    return type(out)(*[None if v is None else packed_unshift(v, cu) for v in out])
