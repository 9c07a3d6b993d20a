"""The sequence stage of :class:`~pyfused_po.FusedKTOLoss` on the one batch representation.

A KTO batch (:mod:`pyfused_po.sequence.batch_layout`) is a stream of ``S`` sequences, each a group of one
(role 0).  :func:`kto_batch` builds it from ``forward``'s inputs and checks them before any
kernel; the staged plan and the three-GEMM plan (:mod:`pyfused_po.plans.fused_kto`) then ask it the same
things:

* ``sources``: the policy and reference inputs, checked against the stream;
* ``token_labels`` / ``token_kwargs``: what the token stage runs on;
* ``groups`` and ``sequence_of(pos)``: each labelled token's sequence, each its own group;
* ``sums(token_logps)``: ``[S]`` per-sequence sums over the labelled tokens, in stream order.

Two forms serve it, as for pairs (:mod:`pyfused_po.sequence.preference_batch`): :class:`PaddedSequences`,
rows of ``T`` tokens with the shift left to the token stage's kernel, and :class:`PackedSequences`,
a packed stream (``cu_seqlens`` / ``position_ids``, optionally a sequence-parallel slice) with the
labels shifted within each sequence and segment sums.
"""
import torch

from .batch_layout import SequenceGroups
from .packed_columns import packed_batch
from .packing import check_desirable_flags
from .sums import sequence_sums


def kto_batch(module, layout, source, ref_source, labels, is_desirable):
    """The batch of one ``FusedKTOLoss.forward`` call (``layout``: a :class:`~pyfused_po.BatchLayout`
    without pair arguments)."""
    if layout.cu_seqlens is None and layout.position_ids is None:
        if layout.token_offset is not None:
            raise ValueError("FusedKTOLoss takes token_offset= only with cu_seqlens= (a packed stream)")
        return PaddedSequences(module, source, ref_source, labels)
    return PackedSequences(module, layout, source, ref_source, labels, is_desirable)


class PaddedSequences:
    """``[B, T]`` rows, one sequence each; the token stage applies ``shift`` itself."""

    def __init__(self, module, source, ref_source, labels):
        if labels.dim() != 2:
            raise ValueError(f"labels must be [batch, seq], got shape {tuple(labels.shape)}")
        self.sources, self.token_labels, self.token_kwargs = (source, ref_source), labels, module.token_kwargs
        self.num_sequences, self._T = labels.shape

    @property
    def groups(self):
        return SequenceGroups.singles(self.num_sequences, self.token_labels.device)

    def sequence_of(self, pos):
        """Sequence (row) of the labelled tokens at flat positions ``pos``."""
        return torch.div(pos, self._T, rounding_mode="floor")

    def sums(self, token_logps):
        kw = self.token_kwargs
        return sequence_sums(token_logps, self.token_labels, ignore_index=kw["ignore_index"], shift=kw["shift"]).logps


class PackedSequences:
    """A packed stream of ``S`` sequences (``is_desirable`` ``[S]``, one flag per sequence): labels
    shifted within each sequence, sums per segment."""

    def __init__(self, module, layout, source, ref_source, labels, is_desirable):
        stream = packed_batch(module, labels, layout.cu_seqlens, layout.position_ids, layout.token_offset)
        self.num_sequences = stream.layout.num_sequences
        check_desirable_flags(is_desirable, self.num_sequences)
        self.sources = stream.sources(source, ref_source)
        self.token_labels = stream.labels
        self.token_kwargs = dict(module.token_kwargs, shift=False)  # labels shifted within each sequence
        self._stream, self._mask = stream, stream.labels != stream.ignore_index

    @property
    def groups(self):
        return SequenceGroups.singles(self.num_sequences, self.token_labels.device)

    def sequence_of(self, pos):
        return self._stream.sequence_of(pos)

    def sums(self, token_logps):
        zero = token_logps.new_zeros(())
        return self._stream.layout.sums(torch.where(self._mask, token_logps, zero))
