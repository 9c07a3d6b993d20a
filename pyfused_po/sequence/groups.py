"""Sequence stage of groups: which sequences answer one prompt, and how they rank.

A batch of S sequences (padded rows or packed sequences in ``cu_seqlens`` order) forms G
groups in one of two ways:

* ``group_size=K``: consecutive sequences, group g = sequences ``g·K … g·K + K − 1``;
* ``group_index=[S]``: the group of each sequence, in any order (groups may differ in size).

``scores=[S]`` (one per sequence, higher is preferred) order each group.  The
:class:`GroupLayout` lists every group's members by descending score (ties keep sequence
order) in a ``[G, K]`` table (K = the largest group; shorter groups are padded at the end
and marked invalid), and the **ordered pairs** of each group: (i, j) with ψ_i > ψ_j.  Tied
members form no pair.

Every check runs here, before any kernel: a ``group_size`` that does not divide S, a group
index out of range, an empty group, a group of one, NaN / infinite scores, scores of the
wrong length, a group whose scores all tie (it carries no preference).  Building the pair
list reads the scores (one host synchronization on CUDA: how many pairs there are depends on
the ties).
"""
from typing import NamedTuple

import torch

from ..token.packed_layout import LAYOUT_INT_DTYPES
from ..validation import check_tensor


class GroupLayout(NamedTuple):
    """``members`` ``[G, K]`` int64 sequence ids by descending score (padding: 0), ``valid``
    ``[G, K]`` bool, ``scores`` ``[G, K]`` the members' scores (padding: 0); the ordered pairs
    ``pair_group``, ``better``, ``worse`` ``[Q]`` (group, better and worse sequence id) and
    ``pair_counts`` ``[G]`` (ordered pairs per group, ≥ 1); ``group_of`` ``[S]`` the group of
    each sequence and ``rank_of`` ``[S]`` its position in its group's row (0 = best)."""

    members: torch.Tensor
    valid: torch.Tensor
    scores: torch.Tensor
    pair_group: torch.Tensor
    better: torch.Tensor
    worse: torch.Tensor
    pair_counts: torch.Tensor
    group_of: torch.Tensor
    rank_of: torch.Tensor

    @property
    def num_groups(self):
        return self.members.shape[0]

    def table(self, per_sequence, fill=0.0):
        """``[S]`` per-sequence values → ``[G, K]`` in the layout's order (``fill`` at padding)."""
        gathered = per_sequence[self.members]
        return torch.where(self.valid, gathered, torch.full((), fill, dtype=gathered.dtype,
                                                                 device=gathered.device))

    def per_sequence(self, table):
        """``[G, K]`` → ``[S]`` (the inverse of :meth:`table` on the real members)."""
        return table[self.group_of, self.rank_of]

    def group_mean(self, per_pair):
        """``[Q]`` per-pair values → ``[G]``: their mean over each group's ordered pairs."""
        sums = per_pair.new_zeros(self.num_groups).index_add(0, self.pair_group, per_pair)
        return sums / self.pair_counts.to(per_pair.dtype)


def _check_scores(scores, num_sequences):
    check_tensor("scores", scores)
    if scores.dim() != 1 or scores.shape[0] != num_sequences:
        raise ValueError(f"scores must have shape ({num_sequences},) (one score per sequence), got "
                         f"{tuple(scores.shape)}")
    if not (scores.is_floating_point() or scores.dtype in LAYOUT_INT_DTYPES):
        raise TypeError(f"scores must be a floating or integer tensor, got {scores.dtype}")
    wide = torch.float64 if scores.dtype in (torch.float64, torch.int64) else torch.float32
    scores = scores.detach().to(wide)
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"scores must be finite (no NaN or inf), got {scores[i].item()} for sequence {i}")
    return scores


def _group_ids(num_sequences, device, group_size, group_index, num_groups):
    """``[S]`` int64 group of each sequence and G, checked."""
    if (group_size is None) == (group_index is None):
        raise ValueError("pass exactly one of group_size=K (consecutive sequences) and group_index=[S], got "
                         f"{'both' if group_size is not None else 'neither'}")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
            raise ValueError(f"group_size must be an integer >= 2 (responses per prompt), got {group_size!r}")
        if num_sequences % group_size:
            raise ValueError(f"group_size={group_size} does not divide the {num_sequences} sequences of the batch")
        G = num_sequences // group_size
        if num_groups is not None and num_groups != G:
            raise ValueError(f"num_groups={num_groups} but group_size={group_size} makes {G} groups of "
                             f"{num_sequences} sequences")
        return torch.arange(num_sequences, device=device) // group_size, G
    if not isinstance(group_index, torch.Tensor) or group_index.dtype not in LAYOUT_INT_DTYPES:
        got = group_index.dtype if isinstance(group_index, torch.Tensor) else type(group_index).__name__
        raise TypeError(f"group_index must be an int32/int64 tensor (the group of each sequence), got {got}")
    if tuple(group_index.shape) != (num_sequences,):
        raise ValueError(f"group_index must have shape ({num_sequences},) (one group id per sequence), got "
                         f"{tuple(group_index.shape)}")
    if group_index.device != device:
        raise ValueError(f"group_index must be on the device of the scores ({device}), got {group_index.device}")
    ids = group_index.to(torch.int64)
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"group_index holds group ids >= 0, got {int(ids.min())}")
    G = (int(ids.max()) + 1 if ids.numel() else 0) if num_groups is None else num_groups
    if ids.numel() and int(ids.max()) >= G:
        raise ValueError(f"group_index must hold group ids in [0, {G}) (num_groups={num_groups}), got "
                         f"{int(ids.max())}")
    return ids, G


def group_layout(scores, *, num_sequences, group_size=None, group_index=None, num_groups=None) -> GroupLayout:
    """The checked :class:`GroupLayout` of a batch of ``num_sequences`` sequences (module docstring)."""
    scores = _check_scores(scores, num_sequences)
    device = scores.device
    group_of, G = _group_ids(num_sequences, device, group_size, group_index, num_groups)
    counts = torch.bincount(group_of, minlength=G)
    if G and int(counts.min()) < 2:
        g = int((counts < 2).nonzero()[0, 0])
        what = "is empty (no sequence has its id)" if int(counts[g]) == 0 else "has one sequence"
        raise ValueError(f"group {g} {what}; every group needs at least 2 responses (group ids must run "
                         f"0..G-1 without gaps)")
    K = int(counts.max()) if G else 0
    # Order by (group, descending score, sequence id): two stable sorts.
    by_score = torch.sort(scores, descending=True, stable=True)[1]
    order = by_score[torch.sort(group_of[by_score], stable=True)[1]]
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(num_sequences, device=device) - starts[group_of[order]]
    members = torch.zeros(G, K, dtype=torch.int64, device=device)
    valid = torch.zeros(G, K, dtype=torch.bool, device=device)
    members[group_of[order], position] = order
    valid[group_of[order], position] = True
    rank_of = torch.empty_like(group_of)
    rank_of[order] = position
    table = torch.where(valid, scores[members], torch.zeros((), dtype=scores.dtype, device=device))
    # Ordered pairs: positions a < b of one row with ψ_a > ψ_b (rows are sorted, so ≥ holds).
    a, b = torch.triu_indices(K, K, offset=1, device=device)
    is_pair = valid[:, b] & (table[:, a] > table[:, b])  # [G, K(K-1)/2]
    pair_counts = is_pair.sum(dim=1)
    if G and int(pair_counts.min()) == 0:
        g = int((pair_counts == 0).nonzero()[0, 0])
        raise ValueError(f"group {g}: all its scores tie ({table[g, 0].item()}), so it orders no pair of "
                         f"responses; give its responses different scores or leave the group out")
    g_id, p_id = is_pair.nonzero(as_tuple=True)
    return GroupLayout(members, valid, table, g_id, members[g_id, a[p_id]], members[g_id, b[p_id]],
                       pair_counts, group_of, rank_of)
