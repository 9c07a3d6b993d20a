"""One batch representation for the loss modules: a stream of sequences, each in a group.

Every batch a loss module takes is a stream of ``S`` sequences of tokens:

* a padded ``[B, T]`` batch is the stream of ``B`` sequences of ``T`` tokens each;
* a packed ``[1, N]`` batch delimits its sequences with ``cu_seqlens`` or ``position_ids``
  (:mod:`pyfused_po.token.packed_layout`).

On top of the stream, the objective's **groups**: each sequence belongs to at most one group and
has a **role** in it.  A preference pair is a group of two (role 0 chosen, 1 rejected; the pair
layouts of :mod:`pyfused_po.sequence.packing` say which sequences), a KTO sequence a group of one (role
0), a group of ``K`` responses to one prompt ``K`` sequences (role: the rank by score;
``group_size=K`` or ``group_index=[S]``, with the call's ``scores``).  :class:`SequenceGroups`
holds that map as two ``[S]`` tensors, whichever kind of group the batch has.

:class:`BatchLayout` is the one object that names the layout arguments of
:meth:`FusedPreferenceLoss.forward <pyfused_po.FusedPreferenceLoss.forward>` (``layout=``); the
separate keywords (``cu_seqlens=``, ``pair_layout=``, …) remain as a compatibility spelling of
the same object.  The plans (staged, three GEMMs, frozen head) are chosen on this one
representation, never on which keywords were passed.
"""
from dataclasses import dataclass, fields, replace
from typing import NamedTuple, Optional

import torch

ROLE_UNUSED = -1  # a sequence in no group (a packed sequence outside chosen_index/rejected_index)


@dataclass(frozen=True)
class BatchLayout:
    """Where the sequences of a batch are and how they form groups (all optional).

    Args:
        cu_seqlens: ``[S + 1]`` int, a packed stream's sequence boundaries.
        position_ids: ``[1, N]`` int restarting at 0 per sequence (instead of ``cu_seqlens``).
        pair_layout: ``"halves"`` (default: sequences ``0..P−1`` chosen, ``P..2P−1`` rejected) or
            ``"interleaved"`` (``c0, r0, c1, r1, …``).
        chosen_index, rejected_index: ``[P]`` sequence ids of each pair's sides (instead of
            ``pair_layout``); other sequences are in no pair.
        token_offset: under sequence parallelism, the index in the whole stream of this rank's
            first token (with the whole stream's ``cu_seqlens``).
        group_size: ``K``: groups of ``K`` responses to one prompt instead of pairs, consecutive
            sequences (padded rows ``g·K … g·K + K − 1``; packed sequences in ``cu_seqlens`` order); or
        group_index: ``[S]`` int, the group of each sequence (any order, groups of any size ≥ 2).
            Either one makes the batch a batch of groups (:mod:`pyfused_po.sequence.groups`; the call then
            takes ``scores=[S]``), and excludes the pair arguments.

    Nothing given: a padded ``[2P, T]`` batch in ``[chosen; rejected]`` halves."""

    cu_seqlens: Optional[torch.Tensor] = None
    position_ids: Optional[torch.Tensor] = None
    pair_layout: Optional[str] = None
    chosen_index: Optional[torch.Tensor] = None
    rejected_index: Optional[torch.Tensor] = None
    token_offset: Optional[int] = None
    group_size: Optional[int] = None
    group_index: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, layout=None, **keywords):
        """The layout of a ``forward`` call: ``layout`` (a :class:`BatchLayout`), or the separate
        keywords (the compatibility spelling); both at once raise."""
        given = {k: v for k, v in keywords.items() if v is not None}
        if layout is None:
            return cls(**given)
        if not isinstance(layout, BatchLayout):
            raise TypeError(f"layout must be a pyfused_po.BatchLayout, got {type(layout).__name__}")
        if given:
            raise ValueError(f"pass the layout once: got layout= and {', '.join(sorted(given))}=")
        return layout

    def with_group_size(self, group_size):
        """This layout with a module's default ``group_size`` (``None``: unchanged): it fills a
        layout that names no groups; a layout with another ``group_size`` raises."""
        if group_size is None or self.group_index is not None:
            return self
        if self.group_size is not None and self.group_size != group_size:
            raise ValueError(f"the layout's group_size={self.group_size!r} differs from the module's "
                             f"group_size={group_size!r}")
        return replace(self, group_size=group_size)

    @property
    def grouped(self):
        """True for a batch of groups (``group_size`` or ``group_index``) rather than pairs."""
        return self.group_size is not None or self.group_index is not None

    def as_kwargs(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def packed(self):
        """True for a packed stream (``cu_seqlens`` or ``position_ids``)."""
        return self.cu_seqlens is not None or self.position_ids is not None

    @property
    def padded_halves(self):
        """True for the padded ``[chosen; rejected]`` batch: no argument, or ``pair_layout="halves"`` alone."""
        given = {k for k, v in self.as_kwargs().items() if v is not None}
        return not given or (given == {"pair_layout"} and self.pair_layout == "halves")


class SequenceGroups(NamedTuple):
    """The sequence → group map of a batch: ``group`` ``[S]`` int64 (0 … ``num_groups`` − 1) and
    ``role`` ``[S]`` int64 (the sequence's place in its group, in a group of K responses its rank by
    descending score; :data:`ROLE_UNUSED` for a sequence
    in no objective group, which still gets a group of its own so that every token has one)."""

    group: torch.Tensor
    role: torch.Tensor
    num_groups: int

    @classmethod
    def pairs(cls, chosen, rejected, num_sequences):
        """Pair ``i`` = sequences ``(chosen[i], rejected[i])``, roles 0 and 1; the other sequences
        follow as groups of one with role :data:`ROLE_UNUSED`."""
        device = chosen.device
        P = chosen.numel()
        group = torch.full((num_sequences,), -1, dtype=torch.int64, device=device)
        role = torch.full((num_sequences,), ROLE_UNUSED, dtype=torch.int64, device=device)
        ids = torch.arange(P, device=device)
        group[chosen], group[rejected] = ids, ids
        role[chosen], role[rejected] = 0, 1
        if 2 * P == num_sequences:  # every sequence is in a pair (ids are distinct): no host read
            return cls(group, role, P)
        unused = (group < 0).nonzero().squeeze(1)  # packed streams with unpaired sequences: one sync
        group[unused] = P + torch.arange(unused.numel(), device=device)
        return cls(group, role, P + unused.numel())

    @classmethod
    def ranked(cls, layout):
        """Groups of K responses: a :class:`~pyfused_po.sequence.groups.GroupLayout`'s group of each
        sequence, the role its rank in the group (0 = the best score)."""
        return cls(layout.group_of, layout.rank_of, layout.num_groups)

    @classmethod
    def singles(cls, num_sequences, device):
        """Each sequence its own group, role 0 (KTO)."""
        ids = torch.arange(num_sequences, device=device)
        return cls(ids, torch.zeros_like(ids), num_sequences)

    def of_tokens(self, sequence_of_token):
        """``[M]`` group id of tokens given their sequence ids."""
        return self.group.index_select(0, sequence_of_token)
