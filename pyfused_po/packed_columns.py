"""Packed batches in the loss modules: the token and sequence stages of a packed stream.

:class:`~pyfused_po.FusedPreferenceLoss` and :class:`~pyfused_po.FusedKTOLoss` call into
here when ``forward`` gets ``cu_seqlens=`` / ``position_ids=`` (or, for the preference
loss, a non-default pair layout on a padded batch, which is the packed stream of equal-length
sequences).  The result is the same per-sequence column dict the padded path builds, in
``[chosen; rejected]`` order, so the sequence-parallel all-reduce and the objective stage
run unchanged.

How: ``shift`` becomes shifted labels (and shifted per-token inputs) within each sequence,
the token stage runs once over the ``[1, N]`` stream with ``shift=False`` and no padding
rows, and every per-sequence sum is a segment sum (:mod:`pyfused_po.packing`).
"""
import torch

from .linear_token_logprobs import linear_token_logprobs
from .packing import (
    PackedLayout,
    check_desirable_flags,
    pair_index,
    packed_layout,
    packed_ld_token_weights,
)
from .sequence import merge_labels
from .token_kl import token_kl
from .token_logprobs import TokenLogprobs, token_logprobs
from .validation import check_same_device, check_tensor

LAYOUT_ARGS = ("cu_seqlens", "position_ids", "pair_layout", "chosen_index", "rejected_index", "token_offset")


class PackedBatch:
    """A packed forward's per-token inputs in the predicting positions (shift already applied
    to the labels and per-token tensors), with its :class:`~pyfused_po.packing.PackedLayout`.

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


def layout_requested(layout):
    """True when a forward got any packed-layout or pair-layout argument (``layout``: name → value)."""
    given = {k for k, v in layout.items() if v is not None}
    # "halves" alone is the padded batch's own order: the padded path serves it.
    return bool(given) and not (given == {"pair_layout"} and layout["pair_layout"] == "halves")


def _packed_batch(module, labels, cu_seqlens, position_ids, token_offset):
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


def _token_stage(module, source, labels, extras=(), inplace=False):
    """The module's token stage on the stream, with ``shift=False`` (the labels
    are shifted already).  Mirrors the modules' own dispatch (vocabulary-parallel,
    fused-linear, logits)."""
    token_kwargs = dict(module.token_kwargs, shift=False)
    if module.parallel.vocab_parallel:
        out = module.parallel.token_stage(source, labels, extras=extras, inplace=inplace, token_kwargs=token_kwargs)
    elif isinstance(source, tuple):
        hidden, weight, bias = source
        out = linear_token_logprobs(hidden, weight, labels, bias=bias, impl=getattr(module, "linear_impl", "auto"),
                                    extras=tuple(extras), **token_kwargs)
    else:
        out = token_logprobs(source, labels, inplace_backward=inplace, extras=tuple(extras), **token_kwargs)
    return out if extras else TokenLogprobs(out)


def _product(a, b):
    return b if a is None else a if b is None else a * b


def preference_columns(module, policy_source, ref_source, labels, *, ref_logits, ref_chosen_logps,
                       ref_rejected_logps, ref_token_logps, token_weights, nll_labels, cu_seqlens=None,
                       position_ids=None, pair_layout=None, chosen_index=None, rejected_index=None,
                       token_offset=None):
    """:meth:`FusedPreferenceLoss._sequence_columns` of a packed batch (see module docstring)."""
    batch = _packed_batch(module, labels, cu_seqlens, position_ids, token_offset)
    layout, ii = batch.layout, batch.ignore_index
    pairs = pair_index(layout.num_sequences, labels.device, pair_layout, chosen_index, rejected_index)
    padded_input = cu_seqlens is None and position_ids is None
    if padded_input and nll_labels is not None and tuple(nll_labels.shape) != tuple(labels.shape):
        raise ValueError(f"with pair_layout/chosen_index on a padded batch nll_labels must be shaped like labels "
                         f"{tuple(labels.shape)} (rows in the batch's own order), got {tuple(nll_labels.shape)}")
    given = [n for n, v in (("ref_logits/ref_hidden", ref_source), ("ref_token_logps", ref_token_logps),
                            ("ref_chosen_logps/ref_rejected_logps",
                             ref_chosen_logps if ref_chosen_logps is not None else ref_rejected_logps))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"pass one reference source, not both: got {' and '.join(given)}")
    if module.expo and (isinstance(policy_source, tuple) or ref_logits is None):
        raise ValueError("loss_type 'expo' needs logits= and ref_logits= (its KL kernel reads both)")
    for name, value in (("ref_token_logps", ref_token_logps), ("token_weights", token_weights)):
        if value is not None:
            check_tensor(name, value, floating=True)
            check_same_device(**{name: value, "labels": labels})
    if nll_labels is not None:
        check_tensor("nll_labels", nll_labels, floating=False)
        check_same_device(nll_labels=nll_labels, labels=labels)
    y = batch.labels
    token_weights = batch.tokens(token_weights, 0, "token_weights")
    ref_token_logps = batch.tokens(ref_token_logps, 0, "ref_token_logps")
    nll = batch.tokens(nll_labels, ii, "nll_labels")
    policy_source = batch.source(policy_source, "hidden" if isinstance(policy_source, tuple) else "logits")
    ref_source = batch.source(ref_source, "ref_hidden" if isinstance(ref_source, tuple) else "ref_logits")
    mask = y != ii
    if nll is not None:
        # nll_labels count on chosen sequences only, as the padded path uses the chosen rows.
        is_chosen = torch.zeros(layout.num_sequences, dtype=torch.bool, device=y.device)
        is_chosen[pairs.chosen] = True
        nll = torch.where(is_chosen[layout.segments].view(batch.shape), nll, torch.full_like(nll, ii))
    token_labels = y if nll is None else merge_labels(y, nll, ignore_index=ii)
    kl_tokens = None
    if module.expo:
        kw = dict(module.token_kwargs, shift=False)
        both = token_kl(policy_source, ref_source.detach(), token_labels, with_logps=True, **kw)
        policy, kl_tokens = TokenLogprobs(both.logps), both.kl
    else:
        extras = (("mean_logit",) if module.logit_metrics else ()) + \
            (("log_sum_sq_probs",) if module.use_weighting else ())
        policy = _token_stage(module, policy_source, token_labels, extras, module.inplace_backward)
    ld = None
    if module.ld_alpha is not None:
        ld = packed_ld_token_weights(mask, layout, pairs, module.ld_alpha, dtype=policy.logps.dtype)
    zero = torch.zeros((), dtype=policy.logps.dtype, device=policy.logps.device)

    def sums(values, weights=None, where=mask):
        values = values if weights is None else values * weights
        return layout.sums(torch.where(where, values, zero))

    lengths = layout.sums(mask.to(torch.float32))
    nll_mask = mask if nll is None else nll != ii
    columns = {"logps": pairs.columns(sums(policy.logps, _product(token_weights, ld))),
               "lengths": pairs.columns(lengths),
               "nll_logps": sums(policy.logps, None, nll_mask)[pairs.chosen],
               "nll_lengths": layout.sums(nll_mask.to(torch.float32))[pairs.chosen]}
    ref_weights = _product(token_weights, ld if module.ld_alpha_reference else None)
    if ref_source is not None and module.needs_reference:
        with torch.no_grad():
            ref_tokens = _token_stage(module, ref_source, y).logps
        columns["ref"] = pairs.columns(sums(ref_tokens, ref_weights))
    elif ref_token_logps is not None:
        columns["ref"] = pairs.columns(sums(ref_token_logps.detach(), ref_weights))
    if kl_tokens is not None:
        columns["kl"] = pairs.columns(sums(kl_tokens))
    if module.use_weighting:
        columns["wpo"] = pairs.columns(sums((policy.logps - policy.log_sum_sq_probs).detach()))
    if policy.mean_logit is not None:
        columns["mean_logit"] = pairs.columns(sums(policy.mean_logit.detach()))
    return columns


def kto_columns(module, logits, labels, is_desirable, ref_logits, *, cu_seqlens=None, position_ids=None,
                token_offset=None):
    """:class:`FusedKTOLoss`'s per-sequence sums of a packed stream: ``policy`` (and ``ref``)
    ``[S]`` in sequence order; ``is_desirable`` is ``[S]``, one flag per packed sequence."""
    if cu_seqlens is None and position_ids is None:
        raise ValueError("FusedKTOLoss takes token_offset= only with cu_seqlens= (a packed stream)")
    batch = _packed_batch(module, labels, cu_seqlens, position_ids, token_offset)
    check_desirable_flags(is_desirable, batch.layout.num_sequences)
    y = batch.labels
    mask = y != batch.ignore_index
    source = batch.source(logits, "logits")
    zero = torch.zeros((), dtype=torch.float32, device=y.device)
    policy = _token_stage(module, source, y, (), module.inplace_backward).logps
    columns = {"policy": batch.layout.sums(torch.where(mask, policy, zero.to(policy.dtype)))}
    if ref_logits is not None:
        with torch.no_grad():
            ref = _token_stage(module, batch.source(ref_logits.detach(), "ref_logits"), y).logps
        columns["ref"] = batch.layout.sums(torch.where(mask, ref, zero.to(ref.dtype)))
    return columns
