"""Packed batches in the loss modules: the token stage's view of a packed stream.

:func:`packed_batch` checks a packed (or padded-as-packed) call's labels and layout and moves
the per-token inputs to the predicting positions.  :class:`~pyfused_po.FusedPreferenceLoss`
builds its pairs on it (:class:`pyfused_po.sequence.preference_batch.PackedPairs`) and
:class:`~pyfused_po.FusedKTOLoss` its sequences (:class:`pyfused_po.sequence.kto_batch.PackedSequences`);
both hand the objective stage the same per-sequence sums as their padded forms, so the
sequence-parallel all-reduce and the objective stage run unchanged.

How: ``shift`` becomes shifted labels (and shifted per-token inputs) within each sequence,
the token stage runs once over the ``[1, N]`` stream with ``shift=False`` and no padding
rows, and every per-sequence sum is a segment sum (:mod:`pyfused_po.sequence.packing`).
"""
import torch

from .packing import PackedLayout, packed_layout
from ..validation import check_tensor

class PackedBatch:
    """A packed forward's per-token inputs in the predicting positions (shift already applied
    to the labels and per-token tensors), with its :class:`~pyfused_po.sequence.packing.PackedLayout`.

    Tensors keep the labels' shape (``[1, N]``, ``[N]``, or ``[B, T]`` for a padded batch served
    with a pair layout): the token stage takes them as they are, so no logits are reshaped or copied.
    """

    def __init__(self, layout: PackedLayout, labels, shift, ignore_index):
        self.layout, self.shift, self.ignore_index = layout, shift, ignore_index
        self.shape, self.n = tuple(labels.shape), labels.numel()
        self.labels = self.tokens(labels, ignore_index, "labels")

    def tokens(self, x, fill, name):
        """A per-token input shaped like the labels, moved within each sequence when shifting."""
        if x is None:
            return None
        if x.numel() != self.n:
            raise ValueError(f"{name} must have one value per packed token like labels {self.shape}, "
                             f"got shape {tuple(x.shape)}")
        x = x.reshape(self.shape)
        return self.layout.shift(x, fill) if self.shift else x

    def sources(self, policy, ref):
        """The policy and reference inputs checked against the stream (:meth:`source`), each named
        by its kind (``hidden`` for an ``(hidden, weight, bias)`` triple, else ``logits``)."""
        def kind(x):
            return "hidden" if isinstance(x, tuple) else "logits"

        return self.source(policy, kind(policy)), self.source(ref, "ref_" + kind(ref))

    def sequence_of(self, pos):
        """Sequence of the labelled tokens at flat positions ``pos`` of the stream."""
        return self.layout.segments.reshape(-1).index_select(0, pos)

    def source(self, x, name):
        """Checks that logits / hidden states hold one row per token, shaped ``labels.shape + (·,)``."""
        if x is None:
            return None
        if isinstance(x, tuple):
            self.source(x[0], name)
            return x
        check_tensor(name, x, floating=True, min_dim=2)
        if tuple(x.shape[:-1]) != self.shape:
            raise ValueError(f"{name} must have shape labels.shape + (size,) = {self.shape} + (·,), one row per "
                             f"packed token, got {tuple(x.shape)}")
        return x


def packed_batch(module, labels, cu_seqlens, position_ids, token_offset):
    if labels is None:
        raise ValueError(f"{type(module).__name__}.forward needs labels=")
    check_tensor("labels", labels, floating=False)
    kw = module.token_kwargs
    if cu_seqlens is None and position_ids is None:
        # A padded [B, T] batch is the packed stream of B sequences of T tokens.
        if token_offset is not None:
            raise ValueError("token_offset goes with cu_seqlens= (a slice of a packed stream)")
        if labels.dim() != 2:
            raise ValueError(f"labels must be [batch, seq] (or pass cu_seqlens= for a packed stream), "
                             f"got shape {tuple(labels.shape)}")
        B, T = labels.shape
        cu_seqlens = torch.arange(0, (B + 1) * T, T, device=labels.device, dtype=torch.int64)[:B + 1]
        layout = packed_layout(labels.reshape(1, B * T), cu_seqlens)
        return PackedBatch(layout, labels, kw["shift"], kw["ignore_index"])
    if module.parallel.sequence_parallel and token_offset is None:
        raise ValueError("under sequence_parallel_group a packed forward needs token_offset= (the index in the "
                         "whole stream of this rank's first token) and the whole stream's cu_seqlens")
    if token_offset is not None and not module.parallel.sequence_parallel:
        raise ValueError("token_offset= (a slice of a packed stream) goes with sequence_parallel_group")
    if position_ids is not None and token_offset is not None:
        raise ValueError("with token_offset= pass the whole stream's cu_seqlens, not position_ids (a slice's "
                         "positions do not say which sequence it continues)")
    layout = packed_layout(labels, cu_seqlens, position_ids, token_offset=token_offset)
    return PackedBatch(layout, labels, kw["shift"], kw["ignore_index"])
