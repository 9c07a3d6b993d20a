"""Sequence stage of packed batches: segment sums and pair layouts.

On a packed stream (:mod:`pyfused_po.token.packed_layout`) the per-sequence sums of the padded
sequence stage become **segment sums**: ``sums[s] = Σ_{t in sequence s} v_t`` (an
``index_add`` over the token's sequence id, O(N), differentiable).  Which sequences form a
pair is the **pair layout**, the sequence stage's mapping from sequences to
``(chosen, rejected)``:

* ``"halves"`` (default, the padded convention): sequences ``0..P−1`` are chosen and
  ``P..2P−1`` rejected, pair ``i`` = ``(i, P + i)``;
* ``"interleaved"``: ``c0, r0, c1, r1, …``, pair ``i`` = ``(2i, 2i + 1)``;
* explicit ``chosen_index`` / ``rejected_index`` (``[P]`` ints each): pair ``i`` =
  ``(chosen_index[i], rejected_index[i])``; every sequence is used at most once and
  sequences in neither list are skipped.

Everything after the pair mapping sees ``[2P]`` columns in ``[chosen; rejected]`` order,
exactly what the padded sequence stage hands the objectives.
"""
from typing import NamedTuple, Optional

import torch

from .. import _dispatch
from ..token.packed_checks import checked_values
from ..token.packed_layout import LAYOUT_INT_DTYPES, packed_shift, resolve_cu_seqlens, segment_ids
from .sums import SequenceSums
from ..validation import check_per_token, checked_labels

PAIR_LAYOUTS = ("halves", "interleaved")


def segment_sum(values, segments, num_segments):
    """``[num_segments]``: Σ of ``values`` ``[N]`` per segment id (``segments`` ``[N]`` int64)."""
    out = values.new_zeros(num_segments)
    return out.index_add(0, segments, values)


class PackedLayout(NamedTuple):
    """A validated packed stream: ``cu_seqlens`` ``[S + 1]`` int64, the sequence of each of
    this call's tokens ``segments`` ``[N]``, and where those tokens start in the stream."""

    cu_seqlens: torch.Tensor
    segments: torch.Tensor
    token_offset: int = 0

    @property
    def num_sequences(self):
        return self.cu_seqlens.numel() - 1

    def sums(self, values):
        """Per-sequence sums ``[S]`` of per-token ``values`` (any shape with N elements)."""
        return segment_sum(values.reshape(-1), self.segments, self.num_sequences)

    def shift(self, x, fill):
        return None if x is None else packed_shift(x, self.cu_seqlens, fill)


def packed_layout(labels, cu_seqlens=None, position_ids=None, *, token_offset=None) -> Optional[PackedLayout]:
    """:class:`PackedLayout` of packed ``labels`` ``[1, N]`` / ``[N]``, or ``None`` when neither
    ``cu_seqlens`` nor ``position_ids`` is given (a padded batch).  ``token_offset``: these
    labels are tokens ``[token_offset, token_offset + N)`` of the stream ``cu_seqlens`` describes."""
    cu = resolve_cu_seqlens(labels, cu_seqlens, position_ids, token_offset=token_offset)
    if cu is None:
        return None
    offset = 0 if token_offset is None else token_offset
    return PackedLayout(cu, segment_ids(cu, labels.numel(), offset), offset)


@_dispatch.register  # sequence_sums(..., cu_seqlens=) runs it
def packed_sequence_sums(token_values, labels, *, cu_seqlens=None, position_ids=None, ignore_index=-100,
                         shift=False, token_weights=None):
    """:func:`pyfused_po.sequence.sums.sequence_sums` of a packed stream: ``[S]`` sums and counts.

    ``token_values`` / ``labels`` / ``token_weights`` are ``[1, N]`` or ``[N]`` aligned with
    the labels (as :func:`pyfused_po.token_logprobs` returns them); with ``shift`` the first
    token of every sequence has no prediction and does not count.
    """
    labels = checked_labels("labels", labels, ignore_index)  # as sequence_sums does on padded batches
    layout = packed_layout(labels, cu_seqlens, position_ids)
    if layout is None:
        raise ValueError("packed_sequence_sums needs cu_seqlens= or position_ids=")
    check_per_token(labels, token_values=token_values, token_weights=token_weights)
    mask = (labels != ignore_index).reshape(-1)
    if shift:
        mask = mask & ~_first_tokens(layout)
    values = token_values.reshape(-1)
    if token_weights is not None:
        values = values * token_weights.reshape(-1)
    values = torch.where(mask, values, values.new_zeros(()))
    return SequenceSums(layout.sums(values), layout.sums(mask.to(torch.float32)))


def _first_tokens(layout):
    n = layout.segments.numel()
    tokens = torch.arange(layout.token_offset, layout.token_offset + n, device=layout.segments.device)
    return tokens == layout.cu_seqlens[layout.segments]


# ----------------------------------------------------------------------------- pair layouts

class PairIndex(NamedTuple):
    """``chosen`` / ``rejected`` ``[P]`` int64 sequence ids; ``order`` = ``[chosen; rejected]``."""

    chosen: torch.Tensor
    rejected: torch.Tensor

    @property
    def order(self):
        return torch.cat([self.chosen, self.rejected])

    def columns(self, per_sequence):
        """``[S]`` per-sequence values → ``[2P]`` in ``[chosen; rejected]`` order."""
        return per_sequence[self.order]


class EverySequence(NamedTuple):
    """The column map of a batch of groups (:mod:`pyfused_po.sequence.groups`): columns stay per sequence,
    ``[S]`` in stream order (the listwise objective orders each group itself); every sequence may
    carry the NLL term (``chosen``: all of them; the objective's ``nll_index`` picks per group)."""

    chosen: torch.Tensor

    @classmethod
    def of(cls, num_sequences, device):
        return cls(torch.arange(num_sequences, device=device))

    def columns(self, per_sequence):
        """``[S]`` per-sequence values, unchanged."""
        return per_sequence


def _check_index(name, index, num_sequences, device):
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of sequence ids, got {type(index).__name__}")
    if index.dtype not in LAYOUT_INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int32/int64), got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{name} must be 1-D [pairs], got shape {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"{name} must be on the device of the tokens ({device}), got {index.device}")
    # Ids in range (packed_checks.sequence_ids_problem), also inside a compiled graph.
    return checked_values(index.to(torch.int64), "sequence_ids", name, num_sequences)


def pair_index(num_sequences, device, pair_layout=None, chosen_index=None, rejected_index=None) -> PairIndex:
    """The :class:`PairIndex` of a batch of ``num_sequences`` sequences (see module docstring).

    Raises for an odd sequence count under ``"halves"`` / ``"interleaved"``, explicit indices
    out of range, of different lengths or overlapping, and for a ``pair_layout`` given
    together with explicit indices.
    """
    explicit = chosen_index is not None or rejected_index is not None
    if explicit and pair_layout is not None:
        raise ValueError(f"pass one pair layout, not both: got pair_layout={pair_layout!r} and "
                         "chosen_index/rejected_index")
    if explicit:
        if chosen_index is None or rejected_index is None:
            raise ValueError("chosen_index and rejected_index go together (one sequence id per pair each)")
        chosen = _check_index("chosen_index", chosen_index, num_sequences, device)
        rejected = _check_index("rejected_index", rejected_index, num_sequences, device)
        if chosen.numel() != rejected.numel():
            raise ValueError(f"chosen_index and rejected_index must have one entry per pair each, got "
                             f"{chosen.numel()} and {rejected.numel()}")
        # No sequence on two pair sides (packed_checks.pair_sides_problem), also inside a compiled graph.
        both = checked_values(torch.cat([chosen, rejected]), "pair_sides", "chosen_index/rejected_index")
        return PairIndex(both[:chosen.numel()], both[chosen.numel():])
    layout = "halves" if pair_layout is None else pair_layout
    if layout not in PAIR_LAYOUTS:
        raise ValueError(f"pair_layout must be one of {PAIR_LAYOUTS} (or pass chosen_index/rejected_index), "
                         f"got {pair_layout!r}")
    if num_sequences % 2:
        raise ValueError(f"a paired loss needs an even number of sequences (pair_layout={layout!r}), "
                         f"got {num_sequences}")
    P = num_sequences // 2
    ids = torch.arange(num_sequences, device=device)
    if layout == "halves":
        return PairIndex(ids[:P], ids[P:])
    return PairIndex(ids[0::2], ids[1::2])


def pair_shared_lengths(lengths, pairs: PairIndex):
    """``[S]``: for each paired sequence, min(n_w, n_l) of its pair (LD-DPO), 0 if unpaired."""
    shared = torch.minimum(lengths[pairs.chosen], lengths[pairs.rejected])
    out = torch.zeros_like(lengths)
    out[pairs.chosen] = shared
    out[pairs.rejected] = shared
    return out


def packed_ld_token_weights(mask, layout: PackedLayout, pairs: PairIndex, ld_alpha, dtype=torch.float32):
    """LD-DPO weights on a packed stream (as :func:`pyfused_po.sequence.sums.ld_token_weights`):
    the first min(n_w, n_l) response tokens of each side weigh 1, the rest ``ld_alpha``."""
    flat = mask.reshape(-1)
    counts = flat.to(torch.int64)
    total = counts.cumsum(0)
    # 1-based index among the response tokens of the token's own sequence.
    before = torch.cat([total.new_zeros(1), total])[layout.cu_seqlens[:-1]]
    position = total - before[layout.segments]
    lengths = segment_sum(counts, layout.segments, layout.num_sequences)
    shared = pair_shared_lengths(lengths, pairs)[layout.segments]
    tail = torch.full(flat.shape, float(ld_alpha), dtype=dtype, device=flat.device)
    weights = torch.where(position <= shared, torch.ones_like(tail), tail)
    return torch.where(flat, weights, torch.zeros_like(weights)).view(mask.shape)


def check_desirable_flags(is_desirable, num_sequences):
    """KTO in packed form: one bool flag per packed sequence, ``[S]``."""
    if not isinstance(is_desirable, torch.Tensor) or is_desirable.dtype != torch.bool:
        got = is_desirable.dtype if isinstance(is_desirable, torch.Tensor) else type(is_desirable).__name__
        raise TypeError(f"is_desirable must be a bool tensor with one flag per packed sequence, got {got}")
    if tuple(is_desirable.shape) != (num_sequences,):
        raise ValueError(f"is_desirable must have shape ({num_sequences},) (one flag per packed sequence, "
                         f"cu_seqlens has {num_sequences}), got {tuple(is_desirable.shape)}")
    return is_desirable
