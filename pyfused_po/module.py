"""``FusedPreferenceLoss``: token stage → sequence stage → objective stage in one module."""
import torch
from torch import nn

from . import packed_columns
from .objectives.aot import check_sorted_batch_options
from .objectives.checks import check_range
from .objectives.transforms import f_divergence_scores
from .preference_loss import (
    REDUCTIONS,
    PreferenceLossOutput,
    preference_loss,
    resolve_hyperparameters,
    resolve_loss_weights,
)
from .sequence import (
    label_mask,
    ld_token_weights,
    merge_labels,
    sequence_sums,
    split_pairs,
)
from . import fused_pairs
from .distributed.options import ParallelOptions
from .float64_state import apply_keeping_float64
from .linear_token_logprobs import linear_token_logprobs
from .objectives import get_objective
from .token_kl import token_kl
from .token_logprobs import TokenLogprobs, token_logprobs
from .validation import as_number, check_same_device, check_shape, check_tensor, checked_labels


class FusedPreferenceLoss(nn.Module):
    """A preference loss straight from logits — or from hidden states and the LM head, the
    logits never materialized — for batches laid out ``[chosen; rejected]``.

    One forward pass and one backward pass over the logits per step; the only
    ``[tokens, vocab]`` allocation in loss + backward is the logits' gradient (none with
    ``inplace_backward=True``, and none at all on the fused-linear path).  Reference log-probs are given per sequence
    (``ref_chosen_logps`` / ``ref_rejected_logps``, as TRL precomputes them), per token
    (``ref_token_logps``), or computed from ``ref_logits`` in the same call, forward only.

    Args:
        loss_type, beta, reduction, loss_weights, f_divergence_type, f_alpha_divergence_coef,
        **hyperparameters: as :func:`pyfused_po.preference_loss`.
        ignore_index, shift, temperature, logit_scale, softcap, backend, inplace_backward:
            as :func:`pyfused_po.token_logprobs`.
        logit_metrics: also log TRL's ``logits/chosen`` and ``logits/rejected`` (mean of the
            transformed logits over labelled tokens), computed in the same kernel pass.
        ld_alpha: LD-DPO; response tokens past the pair's shared length min(n_w, n_l) weigh
            ``ld_alpha`` in the summed log-probs (``None``: off).
        ld_alpha_reference: apply ``ld_alpha`` to the reference sums too (as TRL does) when
            they come from ``ref_logits`` or ``ref_token_logps``.
        use_weighting: WPO; the per-sequence weights come from the kernel's
            ``log_sum_sq_probs`` extra in the same pass.
        linear_impl: for ``hidden=``/``weight=`` inputs, the fused-linear implementation
            (``"auto"``, ``"chunked"`` or ``"fused"``; see :func:`pyfused_po.linear_token_logprobs`).
        vocab_parallel_group, vocab_start, sequence_parallel_group, reduce_grad_hidden: run
            under tensor / context parallelism (:mod:`pyfused_po.distributed.options`):
            ``logits`` (or ``weight``/``bias``) hold this rank's vocabulary slice starting at
            ``vocab_start``; with ``sequence_parallel_group`` the token inputs hold this rank's
            slice of every sequence (``shift`` must be False; ``ld_alpha``, ``use_weighting``
            and ``bco_running_mean`` are unavailable).  Loss, metrics and gradients equal the
            single-process module's on the unsharded tensors.

    ``loss_type="expo"`` (λ > 0) reads the policy and reference logits in one pass of the
    KL kernel (:func:`pyfused_po.token_kl`), so it needs ``logits=`` and ``ref_logits=``;
    it does not log ``logits/*`` metrics and takes neither ``use_weighting`` nor
    ``inplace_backward``.
        bco_running_mean: for ``bco_pair``, keep δ as the running mean of every reward β·s
            seen in training mode (TRL 0.x); off, δ is the ``bco_delta`` hyper-parameter
            (default 0, TRL v1).  The mean lives in buffers and is saved with the state dict.
    """

    # hidden=/weight= inputs: form the exact gradient during the forward when the objective
    # separates over pairs (three GEMMs instead of four; :mod:`pyfused_po.fused_pairs`).
    fused_gradient = True

    def __init__(self, loss_type="sigmoid", beta=0.1, *, ignore_index=-100, shift=False,
                 temperature=1.0, logit_scale=1.0, softcap=None, backend="auto",
                 inplace_backward=False, reduction="mean", logit_metrics=True, loss_weights=None,
                 f_divergence_type="reverse_kl", f_alpha_divergence_coef=1.0, ld_alpha=None,
                 ld_alpha_reference=True, use_weighting=False, bco_running_mean=False,
                 linear_impl="auto", vocab_parallel_group=None, vocab_start=None,
                 sequence_parallel_group=None, reduce_grad_hidden=True, **hyperparameters):
        super().__init__()
        beta, ld_alpha = as_number("beta", beta), as_number("ld_alpha", ld_alpha)  # NumPy / 0-d tensors
        # Fail at construction rather than at the first step.
        resolve_hyperparameters(loss_type, beta, hyperparameters, f_divergence_type=f_divergence_type,
                                f_alpha_divergence_coef=f_alpha_divergence_coef)
        resolve_loss_weights(loss_type, loss_weights)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if ld_alpha is not None:
            check_range("ld_alpha", ld_alpha, 0.0, 1.0)
        types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        if bco_running_mean and "bco_pair" not in types:
            raise ValueError(f"bco_running_mean=True needs 'bco_pair' among the loss types, got {types}")
        if bco_running_mean and "bco_delta" in hyperparameters:
            raise ValueError("pass either bco_running_mean=True or bco_delta, not both")
        self.expo = "expo" in types and float(hyperparameters.get("expo_lambda", 1.0)) > 0
        if self.expo and (use_weighting or inplace_backward):
            raise ValueError("loss_type 'expo' reads logits through the KL kernel, which supports "
                             "neither use_weighting nor inplace_backward")
        self.needs_reference = any(get_objective(t).needs_reference for t in types)
        check_sorted_batch_options(types, use_weighting=use_weighting, reduction=reduction,
                                   label_smoothing=hyperparameters.get("label_smoothing"))
        self.parallel = ParallelOptions(vocab_parallel_group, vocab_start, sequence_parallel_group,
                                        reduce_grad_hidden)
        self.parallel.check_sequence_parallel(shift=shift, ld_alpha=ld_alpha, use_weighting=use_weighting,
                                              bco_running_mean=bco_running_mean)
        if self.expo and (self.parallel.vocab_parallel or self.parallel.sequence_parallel):
            raise ValueError("loss_type 'expo' (the KL kernel) does not support vocab_parallel_group or "
                             "sequence_parallel_group yet")
        self.linear_impl = linear_impl
        self.loss_type, self.beta, self.reduction = loss_type, beta, reduction
        self.hyperparameters = dict(hyperparameters)
        self.objective_kwargs = dict(loss_weights=loss_weights, f_divergence_type=f_divergence_type,
                                     f_alpha_divergence_coef=f_alpha_divergence_coef)
        self.token_kwargs = dict(ignore_index=ignore_index, shift=shift, temperature=temperature,
                                 logit_scale=logit_scale, softcap=softcap, backend=backend)
        self.inplace_backward = inplace_backward
        self.logit_metrics = logit_metrics
        self.ld_alpha, self.ld_alpha_reference = ld_alpha, bool(ld_alpha_reference)
        self.use_weighting = bool(use_weighting)
        self.bco_running_mean = bool(bco_running_mean)
        if self.bco_running_mean:
            self.register_buffer("bco_reward_sum", torch.zeros((), dtype=torch.float64))
            self.register_buffer("bco_reward_count", torch.zeros((), dtype=torch.float64))

    def _apply(self, fn, recurse=True):
        # The BCO running mean is float64 state: device moves apply to it, dtype casts do not.
        return apply_keeping_float64(self, super()._apply, fn, recurse, ("bco_reward_sum", "bco_reward_count"))

    def extra_repr(self):
        return f"loss_type={self.loss_type!r}, beta={self.beta}, {self.token_kwargs}"

    def _token_stage(self, source, labels, *, extras=(), inplace=False) -> TokenLogprobs:
        """The one call into the token stage: ``source`` is a logits tensor or a
        ``(hidden, weight, bias)`` triple for the fused-linear path."""
        kwargs = dict(extras=tuple(extras), **self.token_kwargs)
        if self.parallel.vocab_parallel:
            out = self.parallel.token_stage(source, labels, extras=extras, inplace=inplace,
                                            token_kwargs=self.token_kwargs)
        elif isinstance(source, tuple):
            hidden, weight, bias = source
            out = linear_token_logprobs(hidden, weight, labels, bias=bias, impl=self.linear_impl, **kwargs)
        else:
            out = token_logprobs(source, labels, inplace_backward=inplace, **kwargs)
        return out if extras else TokenLogprobs(out)

    @staticmethod
    def _sources(logits, hidden, weight, bias, ref_logits, ref_hidden, ref_weight, ref_bias):
        """(policy source, reference source or None) from the forward's keyword arguments."""
        if (logits is None) == (hidden is None):
            raise ValueError("FusedPreferenceLoss.forward needs exactly one of logits= or hidden= "
                             f"(got {'both' if logits is not None else 'neither'})")
        if hidden is None and (weight is not None or bias is not None):
            raise ValueError("weight=/bias= go with hidden=, not with logits=")
        if hidden is not None and weight is None:
            raise ValueError("hidden= needs weight= (the LM head, [vocab, hidden_dim])")
        if ref_logits is not None and ref_hidden is not None:
            raise ValueError("pass one reference source, not both: got ref_logits and ref_hidden")
        if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
            raise ValueError("ref_weight=/ref_bias= go with ref_hidden=")
        policy = logits if hidden is None else (hidden, weight, bias)
        reference = ref_logits
        if ref_hidden is not None:
            if ref_weight is None and weight is None:
                raise ValueError("ref_hidden= needs ref_weight= (or weight= to share the head)")
            # Without ref_weight the reference shares the policy's head (frozen under LoRA).
            head, head_bias = (weight, bias) if ref_weight is None else (ref_weight, ref_bias)
            reference = (ref_hidden.detach(), head.detach(),
                         None if head_bias is None else head_bias.detach())
        return policy, reference

    def _mask(self, labels):
        return label_mask(labels, ignore_index=self.token_kwargs["ignore_index"], shift=self.token_kwargs["shift"])

    def _sums(self, token_logps, labels, token_weights):
        return sequence_sums(token_logps, labels, ignore_index=self.token_kwargs["ignore_index"],
                             shift=self.token_kwargs["shift"], token_weights=token_weights)

    def _check_forward_inputs(self, logits, labels, ref_logits, ref_chosen_logps, ref_rejected_logps,
                              ref_token_logps, token_weights, nll_labels, ref_source):
        if labels is None:
            raise ValueError("FusedPreferenceLoss.forward needs labels=")
        check_tensor("labels", labels, floating=False)
        if labels.dim() != 2:
            raise ValueError(f"labels must be [batch, seq] with the batch laid out [chosen; rejected], "
                             f"got shape {tuple(labels.shape)}")
        split_pairs(labels)  # raises on an odd batch
        if self.expo and (isinstance(logits, tuple) or ref_logits is None):
            raise ValueError("loss_type 'expo' needs logits= and ref_logits= (its KL(π_ref ‖ π_θ) "
                             "kernel reads both; the fused-linear path has none yet)")
        given = [n for n, v in (("ref_logits/ref_hidden", ref_source), ("ref_token_logps", ref_token_logps),
                                ("ref_chosen_logps/ref_rejected_logps", ref_chosen_logps
                                 if ref_chosen_logps is not None else ref_rejected_logps)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"pass one reference source, not both: got {' and '.join(given)}")
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

    def _bco_delta(self, policy_sums, ref_chosen_logps, ref_rejected_logps):
        """δ = running mean of the rewards β·s (updated with this batch first, as TRL 0.x did)."""
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError("loss_type 'bco_pair' needs reference log-probs")
        chosen, rejected = split_pairs(policy_sums.detach())
        kind = self.objective_kwargs["f_divergence_type"]
        coef = self.objective_kwargs["f_alpha_divergence_coef"]
        rewards = self.beta * torch.cat([
            f_divergence_scores((chosen - ref_chosen_logps.detach()).double(), kind, coef),
            f_divergence_scores((rejected - ref_rejected_logps.detach()).double(), kind, coef)])
        if self.training:
            self.bco_reward_sum += rewards.sum().to(self.bco_reward_sum.device)
            self.bco_reward_count += rewards.numel()
        return (self.bco_reward_sum / self.bco_reward_count.clamp(min=1.0)).to(rewards.device)

    def forward(self, logits=None, labels=None, ref_chosen_logps=None, ref_rejected_logps=None,
                ref_logits=None, *, hidden=None, weight=None, bias=None, ref_hidden=None,
                ref_weight=None, ref_bias=None, ref_token_logps=None, token_weights=None,
                nll_labels=None, weights=None, label_smoothing=None, cu_seqlens=None, position_ids=None,
                pair_layout=None, chosen_index=None, rejected_index=None,
                token_offset=None) -> PreferenceLossOutput:
        """``logits``: ``[2P, T, V]``, or ``hidden`` ``[2P, T, D]`` with the LM head ``weight``
        ``[V, D]`` (and ``bias`` ``[V]``); ``labels``: ``[2P, T]`` (``ignore_index`` marks prompt
        and padding).  Reference: ``ref_chosen_logps`` / ``ref_rejected_logps`` ``[P]`` each,
        ``ref_token_logps`` ``[2P, T]``, ``ref_logits`` like ``logits``, or ``ref_hidden`` with
        ``ref_weight``/``ref_bias`` (default: the policy's head, detached).  A reference given
        as logits or hidden states runs forward only: nothing saved, no gradient.

        ``token_weights``: ``[2P, T]`` per-token weights of the policy and reference sums
        (TGDPO-style shaping).  ``nll_labels``: ``[P, T]`` (or ``[2P, T]``, first half used)
        labels of the NLL term of ``sft``/``cpo``/``simpo``/``alphapo``/``orpo`` when it covers
        other tokens than ``labels`` (e.g. the prompt); default the chosen rows of ``labels``.
        ``weights``: ``[P]`` per-pair loss weights; ``label_smoothing``: overrides the module's
        (a number or a ``[P]`` tensor of soft labels).

        Packed batches (:mod:`pyfused_po.packing`): ``cu_seqlens=`` or ``position_ids=`` with every
        per-token input flattened to ``[1, N]``; ``pair_layout=`` (``"halves"``, ``"interleaved"``)
        or ``chosen_index=`` / ``rejected_index=`` map sequences (or padded rows) to pairs;
        ``token_offset=`` places a sequence-parallel rank's slice in the stream.
        """
        policy_source, ref_source = self._sources(logits, hidden, weight, bias, ref_logits, ref_hidden,
                                                  ref_weight, ref_bias)
        if labels is not None:  # small label dtypes widened once, for every stage (validation.checked_labels)
            labels = checked_labels("labels", labels, self.token_kwargs["ignore_index"])
        if nll_labels is not None:
            nll_labels = checked_labels("nll_labels", nll_labels, self.token_kwargs["ignore_index"])
        layout = dict(cu_seqlens=cu_seqlens, position_ids=position_ids, pair_layout=pair_layout,
                      chosen_index=chosen_index, rejected_index=rejected_index, token_offset=token_offset)
        if packed_columns.layout_requested(layout):
            columns = packed_columns.preference_columns(
                self, policy_source, ref_source, labels, ref_logits=ref_logits, ref_chosen_logps=ref_chosen_logps,
                ref_rejected_logps=ref_rejected_logps, ref_token_logps=ref_token_logps,
                token_weights=token_weights, nll_labels=nll_labels, **layout)
        else:
            self._check_forward_inputs(policy_source, labels, ref_logits, ref_chosen_logps, ref_rejected_logps,
                                       ref_token_logps, token_weights, nll_labels, ref_source)
            if isinstance(policy_source, tuple) and fused_pairs.applies(self, policy_source, labels, ref_chosen_logps,
                                                                        ref_rejected_logps, token_weights, weights,
                                                                        label_smoothing):
                fused = fused_pairs.fused_forward(self, policy_source, ref_source, labels, ref_chosen_logps,
                                                  ref_rejected_logps, ref_token_logps, token_weights, nll_labels,
                                                  weights, label_smoothing)
                if fused is not None:  # None: a pair longer than the chunk budget
                    return fused
            columns = self._sequence_columns(policy_source, ref_source, labels, ref_token_logps, token_weights,
                                             nll_labels)
        # Under sequence parallelism the sums are partial: one all-reduce makes them whole.
        total = self.parallel.reduce_columns(columns)
        return self._objective(total, ref_chosen_logps, ref_rejected_logps, weights, label_smoothing)

    def _sequence_columns(self, policy_source, ref_source, labels, ref_token_logps, token_weights, nll_labels):
        """Token and sequence stages: per-sequence sums over this process's tokens.

        ``logps`` / ``lengths`` ``[2P]``; ``nll_logps`` / ``nll_lengths`` ``[P]`` (chosen rows
        over the NLL mask, plain sums); and when used: ``ref`` (reference sums), ``kl``
        (EXPO), ``wpo`` (Σ of log p_t − log Σ_v p_v², detached), ``mean_logit`` (Σ of the
        per-token mean logit, detached).  Every value is a sum over tokens, so the sums of
        a sequence split across ranks add up to the unsplit ones.
        """
        token_labels = self._token_labels(labels, nll_labels)
        kl_tokens = None
        if self.expo:
            # One pass of the KL kernel gives the policy log-probs and KL(π_ref ‖ π_θ) per token.
            both = token_kl(policy_source, ref_source.detach(), token_labels, with_logps=True, **self.token_kwargs)
            policy, kl_tokens = TokenLogprobs(both.logps), both.kl
        else:
            policy = self._token_stage(policy_source, token_labels, extras=self._policy_extras(),
                                       inplace=self.inplace_backward)
        if ref_source is not None and self.needs_reference:
            with torch.no_grad():  # the same sums as for given ref_token_logps
                ref_token_logps = self._token_stage(ref_source, labels).logps
        return self._columns_from_tokens(policy, kl_tokens, labels, ref_token_logps, token_weights, nll_labels)

    def _token_labels(self, labels, nll_labels):
        """The token stage's labels: ``labels`` with the chosen rows' NLL labels merged in."""
        if nll_labels is None:
            return labels
        ignore_index = self.token_kwargs["ignore_index"]
        nll_chosen = nll_labels[:labels.shape[0] // 2]
        padded = torch.cat([nll_chosen, torch.full_like(nll_chosen, ignore_index)], dim=0)
        return merge_labels(labels, padded, ignore_index=ignore_index)

    def _policy_extras(self):
        return (("mean_logit",) if self.logit_metrics else ()) + (("log_sum_sq_probs",) if self.use_weighting else ())

    def _columns_from_tokens(self, policy, kl_tokens, labels, ref_token_logps, token_weights, nll_labels):
        """The sequence stage of :meth:`_sequence_columns` on per-token values."""
        mask = self._mask(labels)
        half = labels.shape[0] // 2
        ld = ld_token_weights(mask, self.ld_alpha, dtype=policy.logps.dtype) if self.ld_alpha is not None else None
        ref_weights = _product(token_weights, ld if self.ld_alpha_reference else None)
        sums = self._sums(policy.logps, labels, _product(token_weights, ld))
        zero = torch.zeros((), dtype=policy.logps.dtype, device=policy.logps.device)
        nll_mask = self._mask(nll_labels[:half]) if nll_labels is not None else mask[:half]
        columns = {"logps": sums.logps, "lengths": sums.lengths,
                   "nll_logps": torch.where(nll_mask, policy.logps[:half], zero).sum(-1),
                   "nll_lengths": nll_mask.sum(-1).to(torch.float32)}
        if ref_token_logps is not None:
            columns["ref"] = self._sums(ref_token_logps.detach(), labels, ref_weights).logps
        if kl_tokens is not None:
            columns["kl"] = self._sums(kl_tokens, labels, None).logps
        if self.use_weighting:
            columns["wpo"] = self._sums((policy.logps - policy.log_sum_sq_probs).detach(), labels, None).logps
        if policy.mean_logit is not None:
            columns["mean_logit"] = self._sums(policy.mean_logit.detach(), labels, None).logps
        return columns

    def _objective(self, total, ref_chosen_logps, ref_rejected_logps, weights, label_smoothing):
        """Objective stage on whole per-sequence sums (see :meth:`_sequence_columns`)."""
        if "ref" in total:
            ref_chosen_logps, ref_rejected_logps = split_pairs(total["ref"].detach())
        lengths = total["lengths"].detach().to(torch.float32)
        chosen_lengths, rejected_lengths = split_pairs(lengths)
        kwargs = dict(self.hyperparameters)
        if label_smoothing is not None:
            kwargs["label_smoothing"] = label_smoothing
        if self.bco_running_mean:
            kwargs["bco_delta"] = self._bco_delta(total["logps"], ref_chosen_logps, ref_rejected_logps)
        if self.use_weighting:
            # WPO's per-sequence log-weight: the mean over the response of log p_t − log Σ_v p_v².
            wpo = total["wpo"] / lengths.clamp(min=1).to(total["wpo"].dtype)
            kwargs["chosen_wpo_logps"], kwargs["rejected_wpo_logps"] = split_pairs(wpo)
        chosen_kl, rejected_kl = split_pairs(total["kl"]) if "kl" in total else (None, None)
        chosen_logps, rejected_logps = split_pairs(total["logps"])
        result = preference_loss(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
            loss_type=self.loss_type, beta=self.beta, chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths, reduction=self.reduction, weights=weights,
            use_weighting=self.use_weighting, nll_logps=total["nll_logps"],
            nll_lengths=total["nll_lengths"].detach().to(torch.float32), chosen_kl=chosen_kl,
            rejected_kl=rejected_kl, **self.objective_kwargs, **kwargs,
        )
        if "mean_logit" in total:
            chosen_sum, rejected_sum = split_pairs(total["mean_logit"])
            result.metrics["logits/chosen"] = chosen_sum.sum() / chosen_lengths.sum().clamp(min=1)
            result.metrics["logits/rejected"] = rejected_sum.sum() / rejected_lengths.sum().clamp(min=1)
        return result


def _product(a, b):
    """Elementwise product of optional per-token weights (None = all ones)."""
    if a is None:
        return b
    if b is None:
        return a
    return a * b
