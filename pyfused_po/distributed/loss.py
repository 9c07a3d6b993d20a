"""Fused preference losses (DPO family, SimPO, KTO) under vocabulary and/or sequence parallelism.

* ``vocab_parallel_group`` (+ ``vocab_start``): ``logits`` is this rank's vocabulary slice;
  the token stage is :func:`.vocab_parallel_token_logprobs` (one all-gather per forward,
  none in the backward); everything downstream is replicated and unchanged.
* ``sequence_parallel_group``: ``logits`` / ``labels`` hold this rank's slice of every
  sequence's tokens; the per-sequence partial sums (policy, reference, lengths, NLL
  terms, logit metrics, KTO's KL sums) are summed over the group in **one** all-reduce
  whose backward is the identity (:mod:`.sequence_parallel`), so batch-coupled
  objectives (AOT's sort, KTO's KL estimate, the batch NLL mean) see the full sums.

Both may be set at once (a 2-D tensor × context-parallel mesh).
"""
import torch

from ..kto import FusedKTOLoss, kto_loss
from ..module import FusedPreferenceLoss
from ..preference_loss import preference_loss
from ..sequence import merge_labels, split_pairs
from ..token_logprobs import TokenLogprobs
from .sequence_parallel import all_reduce_columns
from .vocab_parallel import vocab_parallel_linear_token_logprobs, vocab_parallel_token_logprobs


def _check_parallel_options(vocab_parallel_group, vocab_start, sequence_parallel_group, shift, unsupported):
    if (vocab_parallel_group is None) != (vocab_start is None):
        raise ValueError("vocab_parallel_group and vocab_start go together (vocab_start = first vocabulary id "
                         f"of this rank's slice); got vocab_parallel_group={vocab_parallel_group!r}, "
                         f"vocab_start={vocab_start!r}")
    if sequence_parallel_group is not None:
        if shift:
            raise ValueError("sequence_parallel_group needs shift=False: shift the labels before splitting the "
                             "sequences across ranks (a shift inside a slice drops each boundary token)")
        for name, value in unsupported.items():
            if value:
                raise ValueError(f"{name} is not supported with sequence_parallel_group (it needs each "
                                 f"sequence's token order across ranks); got {name}={value!r}")


def _vocab_parallel_token_stage(module, source, labels, extras, inplace, reduce_grad_hidden=True):
    """``source``: this rank's logits slice, or ``(hidden, weight_shard, bias_shard)``."""
    kw = dict(group=module.vocab_parallel_group, vocab_start=module.vocab_start, extras=tuple(extras),
              **module.token_kwargs)
    if isinstance(source, tuple):
        hidden, weight, bias = source
        return vocab_parallel_linear_token_logprobs(hidden, weight, labels, bias_shard=bias,
                                                    reduce_grad_hidden=reduce_grad_hidden, **kw)
    return vocab_parallel_token_logprobs(source, labels, inplace_backward=inplace, **kw)


class DistributedFusedPreferenceLoss(FusedPreferenceLoss):
    """:class:`pyfused_po.FusedPreferenceLoss` with ``vocab_parallel_group=`` / ``vocab_start=``
    and ``sequence_parallel_group=`` (module docstring).  Loss, metrics and gradients equal
    the single-process module's on the gathered tensors.

    Vocabulary parallelism applies to ``logits=`` (this rank's slice) and to ``hidden=`` with
    ``weight=``/``bias=`` holding this rank's rows of the LM head (``reduce_grad_hidden``: see
    :func:`.vocab_parallel_linear_token_logprobs`).  With ``sequence_parallel_group``, ``shift``
    must be False and ``ld_alpha``, ``use_weighting`` and ``bco_running_mean`` are not
    available; ``loss_type="expo"`` is available with neither.
    """

    def __init__(self, loss_type="sigmoid", beta=0.1, *, vocab_parallel_group=None, vocab_start=None,
                 sequence_parallel_group=None, reduce_grad_hidden=True, **kwargs):
        _check_parallel_options(vocab_parallel_group, vocab_start, sequence_parallel_group, kwargs.get("shift"),
                                {k: kwargs.get(k) for k in ("ld_alpha", "use_weighting", "bco_running_mean")})
        super().__init__(loss_type, beta, **kwargs)
        if self.expo and (vocab_parallel_group is not None or sequence_parallel_group is not None):
            raise ValueError("loss_type 'expo' (the KL kernel) does not support vocab_parallel_group or "
                             "sequence_parallel_group yet")
        self.vocab_parallel_group, self.vocab_start = vocab_parallel_group, vocab_start
        self.sequence_parallel_group = sequence_parallel_group
        self.reduce_grad_hidden = bool(reduce_grad_hidden)

    def _token_stage(self, source, labels, *, extras=(), inplace=False):
        """The module's one call into the token stage, vocabulary-parallel when asked."""
        if self.vocab_parallel_group is None:
            return super()._token_stage(source, labels, extras=extras, inplace=inplace)
        out = _vocab_parallel_token_stage(self, source, labels, extras, inplace, self.reduce_grad_hidden)
        return out if extras else TokenLogprobs(out)

    def forward(self, logits=None, labels=None, ref_chosen_logps=None, ref_rejected_logps=None,
                ref_logits=None, **kwargs):
        """As :meth:`pyfused_po.FusedPreferenceLoss.forward`.  Under sequence parallelism
        ``logits`` / ``hidden``, ``labels``, ``ref_logits`` / ``ref_hidden``, ``ref_token_logps``,
        ``token_weights`` and ``nll_labels`` are this rank's token slices;
        ``ref_chosen_logps`` / ``ref_rejected_logps`` and ``weights`` are full per-pair values."""
        args = (logits, labels, ref_chosen_logps, ref_rejected_logps, ref_logits)
        if self.sequence_parallel_group is None:
            return super().forward(*args, **kwargs)
        return self._sequence_parallel_forward(*args, **kwargs)

    def _sequence_parallel_forward(self, logits, labels, ref_chosen_logps, ref_rejected_logps, ref_logits, *,
                                   hidden=None, weight=None, bias=None, ref_hidden=None, ref_weight=None,
                                   ref_bias=None, ref_token_logps=None, token_weights=None, nll_labels=None,
                                   weights=None, label_smoothing=None):
        policy_source, ref_source = self._sources(logits, hidden, weight, bias, ref_logits, ref_hidden,
                                                  ref_weight, ref_bias)
        self._check_forward_inputs(policy_source, labels, ref_logits, ref_chosen_logps, ref_rejected_logps,
                                   ref_token_logps, token_weights, nll_labels, ref_source)
        ignore_index = self.token_kwargs["ignore_index"]
        mask = self._mask(labels)
        half = labels.shape[0] // 2
        token_labels = labels
        if nll_labels is not None:
            nll_chosen = nll_labels[:half]
            padded = torch.cat([nll_chosen, torch.full_like(nll_chosen, ignore_index)], dim=0)
            token_labels = merge_labels(labels, padded, ignore_index=ignore_index)
        extras = ("mean_logit",) if self.logit_metrics else ()
        policy = self._token_stage(policy_source, token_labels, extras=extras, inplace=self.inplace_backward)
        zero = torch.zeros((), dtype=policy.logps.dtype, device=policy.logps.device)

        # This rank's partial per-sequence sums, all summed over the group in one all-reduce.
        local = self._sums(policy.logps, labels, token_weights)
        nll_mask = self._mask(nll_labels[:half]) if nll_labels is not None else mask[:half]
        columns = {"logps": local.logps, "lengths": local.lengths,
                   "nll_logps": torch.where(nll_mask, policy.logps[:half], zero).sum(-1),
                   "nll_lengths": nll_mask.sum(-1)}
        if ref_source is not None and self.needs_reference:
            with torch.no_grad():
                ref_tokens = self._token_stage(ref_source, labels).logps
            columns["ref"] = self._sums(ref_tokens, labels, token_weights).logps
        elif ref_token_logps is not None:
            columns["ref"] = self._sums(ref_token_logps.detach(), labels, token_weights).logps.detach()
        if policy.mean_logit is not None:
            columns["mean_logit"] = torch.where(mask, policy.mean_logit.detach(), zero).sum(-1)
        total = dict(zip(columns, all_reduce_columns(list(columns.values()), self.sequence_parallel_group)))

        if "ref" in total:
            ref_chosen_logps, ref_rejected_logps = split_pairs(total["ref"].detach())
        kwargs = dict(self.hyperparameters)
        if label_smoothing is not None:
            kwargs["label_smoothing"] = label_smoothing
        chosen_logps, rejected_logps = split_pairs(total["logps"])
        lengths = total["lengths"].detach().to(torch.float32)
        chosen_lengths, rejected_lengths = split_pairs(lengths)
        result = preference_loss(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
            loss_type=self.loss_type, beta=self.beta, chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths, reduction=self.reduction, weights=weights,
            nll_logps=total["nll_logps"], nll_lengths=total["nll_lengths"].detach().to(torch.float32),
            **self.objective_kwargs, **kwargs,
        )
        if "mean_logit" in total:
            chosen_sum, rejected_sum = split_pairs(total["mean_logit"].detach())
            result.metrics["logits/chosen"] = chosen_sum.sum() / chosen_lengths.sum().clamp(min=1)
            result.metrics["logits/rejected"] = rejected_sum.sum() / rejected_lengths.sum().clamp(min=1)
        return result


class DistributedFusedKTOLoss(FusedKTOLoss):
    """:class:`pyfused_po.kto.FusedKTOLoss` with ``vocab_parallel_group=`` / ``vocab_start=`` and
    ``sequence_parallel_group=``.

    Under sequence parallelism ``logits``, ``labels`` and ``ref_logits`` are this rank's token
    slices, ``ref_logps`` holds full per-sequence sums, and ``policy_kl_logps`` /
    ``ref_kl_logps`` are this rank's **partial** sums of the mismatched completions (what its
    token stage gives): they are summed over the group, in the same all-reduce, before the
    batch-wide KL estimate z₀ = max(0, mean(policy_kl − ref_kl)) is taken.
    """

    def __init__(self, beta=0.1, *, vocab_parallel_group=None, vocab_start=None, sequence_parallel_group=None,
                 **kwargs):
        _check_parallel_options(vocab_parallel_group, vocab_start, sequence_parallel_group, kwargs.get("shift"), {})
        super().__init__(beta, **kwargs)
        self.vocab_parallel_group, self.vocab_start = vocab_parallel_group, vocab_start
        self.sequence_parallel_group = sequence_parallel_group

    def _token_stage(self, logits, labels, *, inplace=False):
        if self.vocab_parallel_group is None:
            return super()._token_stage(logits, labels, inplace=inplace)
        return _vocab_parallel_token_stage(self, logits, labels, (), inplace)

    def forward(self, logits=None, labels=None, is_desirable=None, ref_logps=None, ref_logits=None, *,
                kl=None, policy_kl_logps=None, ref_kl_logps=None):
        """As :meth:`pyfused_po.kto.FusedKTOLoss.forward` (class docstring for the slices)."""
        group = self.sequence_parallel_group
        if group is None or logits is None or labels is None or is_desirable is None or \
                (ref_logps is None) == (ref_logits is None) or \
                not isinstance(labels, torch.Tensor) or labels.dim() != 2 or \
                (ref_logits is not None and tuple(ref_logits.shape) != tuple(logits.shape)):
            # No sequence parallelism, or inputs the parent rejects with its own message.
            return super().forward(logits, labels, is_desirable, ref_logps, ref_logits, kl=kl,
                                   policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
        policy = self._sums(self._token_stage(logits, labels, inplace=self.inplace_backward), labels)
        columns = [policy]
        if ref_logits is not None:
            with torch.no_grad():
                columns.append(self._sums(self._token_stage(ref_logits.detach(), labels), labels))
        both_kl = policy_kl_logps is not None and ref_kl_logps is not None
        if both_kl:
            columns += [policy_kl_logps.detach(), ref_kl_logps.detach()]
        total = all_reduce_columns(columns, group)
        policy = total[0]
        if ref_logits is not None:
            ref_logps = total[1].detach()
        if both_kl:
            policy_kl_logps, ref_kl_logps = total[-2].detach(), total[-1].detach()
        return kto_loss(policy, ref_logps, is_desirable, kl=kl, policy_kl_logps=policy_kl_logps,
                        ref_kl_logps=ref_kl_logps, **self.loss_kwargs)
