"""The sequence stage of :class:`~pyfused_po.FusedPreferenceLoss` on its one batch representation.

A preference batch (:mod:`pyfused_po.sequence.batch_layout`) is a stream of sequences grouped in pairs.
:func:`preference_batch` builds it from ``forward``'s inputs and checks them before any kernel;
every plan then asks it the same things:

* ``token_labels`` / ``token_kwargs``: what the token stage runs on (``labels``: the same without
  the NLL labels, for the reference);
* ``sequence_of(pos)`` and ``groups``: each labelled token's sequence and each sequence's pair
  (the three-GEMM plan chunks by pair);
* ``columns(policy, kl_tokens, ref_tokens)``: the per-sequence column dict the objective stage
  takes (``logps``, ``lengths`` ``[2P]`` in ``[chosen; rejected]`` order, ``nll_logps`` /
  ``nll_lengths`` ``[P]``, and ``ref``, ``kl``, ``wpo``, ``mean_logit`` when used), from per-token
  values; every value is a sum over tokens, so a sequence split across ranks adds up.

Two forms serve it.  :class:`PaddedPairs` is the padded ``[chosen; rejected]`` batch (rows of
``T`` tokens, sums along the row; the token stage shifts in the kernel).  :class:`PackedPairs`
is every other layout: a packed stream, or a padded batch with another pair layout (the stream of
equal-length sequences): labels shifted within each sequence, segment sums (:mod:`pyfused_po.sequence.packing`).
"""
import torch

from .batch_layout import SequenceGroups
from .packed_columns import packed_batch
from .groups import group_layout
from .packing import EverySequence, pair_index, packed_ld_token_weights
from .sums import label_mask, ld_token_weights, merge_labels, sequence_sums, split_pairs
from ..validation import check_exclusive, check_same_device, check_shape, check_tensor


def product(a, b):
    """Elementwise product of optional per-token weights (None = all ones)."""
    return b if a is None else a if b is None else a * b


def check_one_reference(ref_source, ref_token_logps, ref_chosen_logps, ref_rejected_logps, ref_logps=None):
    """One reference source per call (the library's one rule, :func:`~pyfused_po.validation.check_exclusive`)."""
    check_exclusive("reference source", **{
        "ref_logits/ref_hidden": ref_source, "ref_token_logps": ref_token_logps,
        "ref_chosen_logps/ref_rejected_logps": ref_chosen_logps if ref_chosen_logps is not None else ref_rejected_logps,
        "ref_logps": ref_logps})


def preference_batch(module, layout, policy_source, ref_source, labels, *, ref_logits, ref_chosen_logps,
                     ref_rejected_logps, ref_token_logps, token_weights, nll_labels, scores=None, ref_logps=None):
    """The batch of one ``forward`` call (``layout``: a :class:`~pyfused_po.BatchLayout`; a batch
    of groups takes ``scores`` ``[S]`` and may take the reference as ``ref_logps`` ``[S]``)."""
    cls = PaddedPairs if layout.padded_halves else PackedPairs  # a layout with groups is not padded halves
    groups = dict(scores=scores, ref_logps=ref_logps) if layout.grouped else {}
    return cls(module, layout, policy_source, ref_source, labels, ref_logits=ref_logits,
               ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
               ref_token_logps=ref_token_logps, token_weights=token_weights, nll_labels=nll_labels, **groups)


class PaddedPairs:
    """``[2P, T]`` rows, the first half chosen: the stream of ``2P`` sequences of ``T`` tokens,
    pair ``i`` = rows ``(i, P + i)``.  The token stage applies ``shift`` itself (values stay at
    the labels' positions)."""

    packed = False

    def __init__(self, module, layout, policy_source, ref_source, labels, *, ref_logits, ref_chosen_logps,
                 ref_rejected_logps, ref_token_logps, token_weights, nll_labels):
        _check_padded_inputs(module, policy_source, labels, ref_logits, ref_token_logps, token_weights, nll_labels)
        check_one_reference(ref_source, ref_token_logps, ref_chosen_logps, ref_rejected_logps)
        self.config, self.sources = module, (policy_source, ref_source)
        self.labels, self.ref_token_logps, self.token_weights, self.nll_labels = (
            labels, ref_token_logps, token_weights, nll_labels)
        self.token_kwargs = module.token_kwargs
        ii = self.token_kwargs["ignore_index"]
        P, self.T = labels.shape[0] // 2, labels.shape[1]
        if nll_labels is None:
            self.token_labels = labels
        else:  # the chosen rows' NLL labels merged in
            nll_chosen = nll_labels[:P]
            padded = torch.cat([nll_chosen, torch.full_like(nll_chosen, ii)], dim=0)
            self.token_labels = merge_labels(labels, padded, ignore_index=ii)

    @property
    def groups(self):
        """Pair ``i`` = rows ``(i, P + i)`` (built only when a plan asks: a data-dependent map)."""
        B = self.labels.shape[0]
        ids = torch.arange(B, device=self.labels.device)
        return SequenceGroups.pairs(ids[:B // 2], ids[B // 2:], B)

    def sequence_of(self, pos):
        """Sequence (row) of the labelled tokens at flat positions ``pos``."""
        return torch.div(pos, self.T, rounding_mode="floor")

    def _mask(self, labels):
        kw = self.token_kwargs
        return label_mask(labels, ignore_index=kw["ignore_index"], shift=kw["shift"])

    def _sums(self, values, weights):
        kw = self.token_kwargs
        return sequence_sums(values, self.labels, ignore_index=kw["ignore_index"], shift=kw["shift"],
                             token_weights=weights)

    def columns(self, policy, kl_tokens=None, ref_tokens=None):
        """Per-sequence columns from per-token values (see the module docstring)."""
        m, labels = self.config, self.labels
        mask = self._mask(labels)
        half = labels.shape[0] // 2
        ld = ld_token_weights(mask, m.ld_alpha, dtype=policy.logps.dtype) if m.ld_alpha is not None else None
        ref_weights = product(self.token_weights, ld if m.ld_alpha_reference else None)
        sums = self._sums(policy.logps, product(self.token_weights, ld))
        zero = torch.zeros((), dtype=policy.logps.dtype, device=policy.logps.device)
        nll_mask = self._mask(self.nll_labels[:half]) if self.nll_labels is not None else mask[:half]
        columns = {"logps": sums.logps, "lengths": sums.lengths,
                   "nll_logps": torch.where(nll_mask, policy.logps[:half], zero).sum(-1),
                   "nll_lengths": nll_mask.sum(-1).to(torch.float32)}
        ref_tokens = self.ref_token_logps if ref_tokens is None else ref_tokens
        if ref_tokens is not None:
            columns["ref"] = self._sums(ref_tokens.detach(), ref_weights).logps
        if kl_tokens is not None:
            columns["kl"] = self._sums(kl_tokens, None).logps
        if m.use_weighting:
            columns["wpo"] = self._sums((policy.logps - policy.log_sum_sq_probs).detach(), None).logps
        if policy.mean_logit is not None:
            columns["mean_logit"] = self._sums(policy.mean_logit.detach(), None).logps
        return columns


def _check_padded_inputs(module, logits, labels, ref_logits, ref_token_logps, token_weights, nll_labels):
    if labels is None:
        raise ValueError("FusedPreferenceLoss.forward needs labels=")
    check_tensor("labels", labels, floating=False)
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, seq] with the batch laid out [chosen; rejected], "
                         f"got shape {tuple(labels.shape)}")
    split_pairs(labels)  # raises on an odd batch
    if module.expo and (isinstance(logits, tuple) or ref_logits is None):
        raise ValueError("loss_type 'expo' needs logits= and ref_logits= (its KL(π_ref ‖ π_θ) "
                         "kernel reads both; the fused-linear path has none yet)")
    if ref_logits is not None and not isinstance(logits, tuple) and tuple(ref_logits.shape) != tuple(logits.shape):
        raise ValueError(f"ref_logits must have the shape of logits {tuple(logits.shape)}, "
                         f"got {tuple(ref_logits.shape)}")
    for name, value in (("ref_token_logps", ref_token_logps), ("token_weights", token_weights)):
        if value is not None:
            check_tensor(name, value, floating=True)
            check_shape(name, value, labels.shape, "one value per token, like labels")
            check_same_device(**{name: value, "labels": labels})
    if nll_labels is not None:
        check_tensor("nll_labels", nll_labels, floating=False)
        half = labels.shape[0] // 2
        if nll_labels.dim() != 2 or nll_labels.shape[1] != labels.shape[1] or \
                nll_labels.shape[0] not in (half, labels.shape[0]):
            raise ValueError(f"nll_labels must be [{half}, {labels.shape[1]}] (the chosen rows) or "
                             f"{list(labels.shape)} like labels, got {tuple(nll_labels.shape)}")
        check_same_device(nll_labels=nll_labels, labels=labels)


class PackedPairs:
    """Every other layout: a packed stream (``cu_seqlens`` / ``position_ids``), a padded batch
    with another pair layout, or a batch of groups of K responses (padded or packed).  With
    ``shift`` the labels and per-token inputs move within each sequence and the token stage runs
    with ``shift=False`` (values at the predicting positions); sums are segment sums; the pair
    layout maps sequences to ``[chosen; rejected]`` columns, while a batch of groups keeps them
    per sequence (``[S]``, :class:`~pyfused_po.sequence.packing.EverySequence`) with its
    :class:`~pyfused_po.sequence.groups.GroupLayout` in :attr:`group_layout`."""

    packed = True

    def __init__(self, module, layout, policy_source, ref_source, labels, *, ref_logits, ref_chosen_logps,
                 ref_rejected_logps, ref_token_logps, token_weights, nll_labels, scores=None, ref_logps=None):
        batch = packed_batch(module, labels, layout.cu_seqlens, layout.position_ids, layout.token_offset)
        self.config, self.layout, ii = module, batch.layout, batch.ignore_index
        self._stream = batch
        self.group_layout = None
        if layout.grouped:  # groups of K: the sequence → group map and each group's order by score
            check_same_device(scores=scores, labels=labels)
            self.group_layout = group_layout(scores, num_sequences=self.layout.num_sequences,
                                             group_size=layout.group_size, group_index=layout.group_index)
            self.pairs = EverySequence.of(self.layout.num_sequences, labels.device)
        else:
            self.pairs = pair_index(self.layout.num_sequences, labels.device, layout.pair_layout,
                                    layout.chosen_index, layout.rejected_index)
        if not layout.packed and nll_labels is not None and tuple(nll_labels.shape) != tuple(labels.shape):
            raise ValueError(f"with pair_layout/chosen_index on a padded batch nll_labels must be shaped like "
                             f"labels {tuple(labels.shape)} (rows in the batch's own order), got "
                             f"{tuple(nll_labels.shape)}")
        check_one_reference(ref_source, ref_token_logps, ref_chosen_logps, ref_rejected_logps, ref_logps)
        if module.expo and (isinstance(policy_source, tuple) or ref_logits is None):
            raise ValueError("loss_type 'expo' needs logits= and ref_logits= (its KL kernel reads both)")
        for name, value in (("ref_token_logps", ref_token_logps), ("token_weights", token_weights)):
            if value is not None:
                check_tensor(name, value, floating=True)
                check_same_device(**{name: value, "labels": labels})
        if nll_labels is not None:
            check_tensor("nll_labels", nll_labels, floating=False)
            check_same_device(nll_labels=nll_labels, labels=labels)
        self.labels = y = batch.labels
        self.token_weights = batch.tokens(token_weights, 0, "token_weights")
        self.ref_token_logps = batch.tokens(ref_token_logps, 0, "ref_token_logps")
        nll = batch.tokens(nll_labels, ii, "nll_labels")
        self.sources = batch.sources(policy_source, ref_source)
        self.mask = y != ii
        if nll is not None:
            # nll_labels count on chosen sequences only, as the padded path uses the chosen rows
            # (on every sequence of a batch of groups: the objective's nll_index picks).
            is_chosen = torch.zeros(self.layout.num_sequences, dtype=torch.bool, device=y.device)
            is_chosen[self.pairs.chosen] = True
            nll = torch.where(is_chosen[self.layout.segments].view(batch.shape), nll, torch.full_like(nll, ii))
        self.nll_mask = self.mask if nll is None else nll != ii
        self.token_labels = y if nll is None else merge_labels(y, nll, ignore_index=ii)
        self.token_kwargs = dict(module.token_kwargs, shift=False)  # the labels are shifted already

    @property
    def groups(self):
        """The pairs of the pair layout (a sequence in no pair is a group of its own), or the
        groups of K responses (role: the rank by score)."""
        if self.group_layout is not None:
            return SequenceGroups.ranked(self.group_layout)
        return SequenceGroups.pairs(self.pairs.chosen, self.pairs.rejected, self.layout.num_sequences)

    def sequence_of(self, pos):
        return self._stream.sequence_of(pos)

    def _sums(self, values, weights=None, where=None):
        values = values if weights is None else values * weights
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        return self.layout.sums(torch.where(self.mask if where is None else where, values, zero))

    def columns(self, policy, kl_tokens=None, ref_tokens=None):
        """Per-sequence columns from per-token values (see the module docstring)."""
        m, pairs, layout = self.config, self.pairs, self.layout
        ld = None
        if m.ld_alpha is not None:
            ld = packed_ld_token_weights(self.mask, layout, pairs, m.ld_alpha, dtype=policy.logps.dtype)
        columns = {"logps": pairs.columns(self._sums(policy.logps, product(self.token_weights, ld))),
                   "lengths": pairs.columns(layout.sums(self.mask.to(torch.float32))),
                   "nll_logps": self._sums(policy.logps, None, self.nll_mask)[pairs.chosen],
                   "nll_lengths": layout.sums(self.nll_mask.to(torch.float32))[pairs.chosen]}
        ref_weights = product(self.token_weights, ld if m.ld_alpha_reference else None)
        ref_tokens = self.ref_token_logps if ref_tokens is None else ref_tokens
        if ref_tokens is not None:
            columns["ref"] = pairs.columns(self._sums(ref_tokens.detach(), ref_weights))
        if kl_tokens is not None:
            columns["kl"] = pairs.columns(self._sums(kl_tokens))
        if m.use_weighting:
            columns["wpo"] = pairs.columns(self._sums((policy.logps - policy.log_sum_sq_probs).detach()))
        if policy.mean_logit is not None:
            columns["mean_logit"] = pairs.columns(self._sums(policy.mean_logit.detach()))
        return columns
