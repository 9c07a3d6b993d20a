"""``FusedPreferenceLoss``: token stage → sequence stage → objective stage in one module."""
import torch
from torch import nn

from ..objectives.aot import check_sorted_batch_options
from ..objectives.checks import check_range
from ..objectives.transforms import f_divergence_scores
from ..objectives.preference_loss import (
    REDUCTIONS,
    PreferenceLossOutput,
    preference_loss,
    resolve_hyperparameters,
    resolve_loss_weights,
)
from ..sequence.sums import split_pairs
from ..plans import fused_pairs
from ..sequence.batch_layout import BatchLayout
from ..sequence.preference_batch import preference_batch
from .preference_groups import check_group_call, check_group_options, group_objective, group_plan
from ..distributed.options import ParallelOptions
from .float64_state import apply_keeping_float64
from ..plans.head_source import check_invariant_options, resolve_sources, run_token_stage
from ..objectives import get_objective
from ..token.token_kl import token_kl
from ..token.token_logprobs import TokenLogprobs
from ..validation import as_number, checked_labels


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
        batch_invariant: the token stage's ``batch_invariant=True`` (:func:`pyfused_po.token_logprobs`,
            :func:`pyfused_po.linear_token_logprobs`): each token's log-prob and extras, and its
            logits-gradient row for a given ``∂L/∂ log p_t``, are bitwise independent of the rest
            of the batch.  On ``hidden=`` it selects the staged plan (4 GEMMs,
            :data:`pyfused_po.plans.fused_gradient.INVARIANT_PLAN_REASON`).  The loss itself is a function
            of the whole batch (the mean over pairs) and is not invariant.  Not with
            ``vocab_parallel_group`` nor ``loss_type="expo"`` (``ValueError``).

        group_size: ``K``: the batch is groups of ``K`` consecutive responses to one prompt, not
            pairs (see :meth:`forward`; ``loss_type`` a listwise type such as ``"plackett_luce"``
            or any pair type, averaged over each group's ordered pairs; ``nll_alpha`` weighs the
            NLL term of ``nll_index``).  Without it a call may still pass groups in its layout.

    ``loss_type="expo"`` (λ > 0) reads the policy and reference logits in one pass of the
    KL kernel (:func:`pyfused_po.token_kl`), so it needs ``logits=`` and ``ref_logits=``;
    it does not log ``logits/*`` metrics and takes neither ``use_weighting`` nor
    ``inplace_backward``.
        bco_running_mean: for ``bco_pair``, keep δ as the running mean of every reward β·s
            seen in training mode (TRL 0.x); off, δ is the ``bco_delta`` hyper-parameter
            (default 0, TRL v1).  The mean lives in buffers and is saved with the state dict.
    """

    # hidden=/weight= inputs: form the exact gradient during the forward when the objective
    # separates over pairs (three GEMMs instead of four; :mod:`pyfused_po.plans.fused_pairs`).
    fused_gradient = True
    # A pair with more labelled tokens than the plan's chunk: "staged" (4 GEMMs, logged once; the
    # default, whose peak stays under TRL's) or "three_gemm" (a chunk as long as the pair: 3 GEMMs,
    # a larger [C, V] chunk).  :data:`pyfused_po.plans.fused_gradient.LONG_GROUP_PLANS`.
    long_group_plan = "staged"
    fallback_reason = None  # why the last call on hidden= ran the staged plan, when the loss separates

    def __init__(self, loss_type="sigmoid", beta=0.1, *, ignore_index=-100, shift=False,
                 temperature=1.0, logit_scale=1.0, softcap=None, backend="auto",
                 inplace_backward=False, reduction="mean", logit_metrics=True, loss_weights=None,
                 f_divergence_type="reverse_kl", f_alpha_divergence_coef=1.0, ld_alpha=None,
                 ld_alpha_reference=True, use_weighting=False, bco_running_mean=False,
                 linear_impl="auto", vocab_parallel_group=None, vocab_start=None,
                 sequence_parallel_group=None, reduce_grad_hidden=True, group_size=None, batch_invariant=False,
                 **hyperparameters):
        super().__init__()
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size < 2):
            raise ValueError(f"group_size must be an integer >= 2 (responses per prompt), got {group_size!r}")
        self.group_size = group_size
        # nll_alpha: weight of the NLL term of nll_index's members (groups only; checked per call)
        self.nll_alpha = as_number("nll_alpha", hyperparameters.pop("nll_alpha", None))
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
        self.batch_invariant = check_invariant_options("FusedPreferenceLoss", batch_invariant, self.parallel,
                                                       expo=self.expo)
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
        if group_size is not None:
            check_group_options(self)

    def _apply(self, fn, recurse=True):
        # The BCO running mean is float64 state: device moves apply to it, dtype casts do not.
        return apply_keeping_float64(self, super()._apply, fn, recurse, ("bco_reward_sum", "bco_reward_count"))

    def extra_repr(self):
        groups = "" if self.group_size is None else f", group_size={self.group_size}"
        return f"loss_type={self.loss_type!r}, beta={self.beta}{groups}, {self.token_kwargs}"

    def _token_stage(self, source, labels, *, extras=(), inplace=False) -> TokenLogprobs:
        """The one call into the token stage: ``source`` is a logits tensor or a
        ``(hidden, weight, bias)`` triple for the fused-linear path."""
        return run_token_stage(self, source, labels, extras=extras, inplace=inplace)

    @staticmethod
    def _sources(logits, hidden, weight, bias, ref_logits, ref_hidden, ref_weight, ref_bias):
        """(policy source, reference source or None) from the forward's keyword arguments."""
        return resolve_sources("FusedPreferenceLoss", logits, hidden, weight, bias, ref_logits, ref_hidden,
                               ref_weight, ref_bias)

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
                token_offset=None, layout=None, group_index=None, scores=None, ref_logps=None,
                nll_index=None) -> PreferenceLossOutput:
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

        Packed batches (:mod:`pyfused_po.sequence.packing`): ``cu_seqlens=`` or ``position_ids=`` with every
        per-token input flattened to ``[1, N]``; ``pair_layout=`` (``"halves"``, ``"interleaved"``)
        or ``chosen_index=`` / ``rejected_index=`` map sequences (or padded rows) to pairs;
        ``token_offset=`` places a sequence-parallel rank's slice in the stream.  ``layout=`` (a
        :class:`~pyfused_po.BatchLayout`) groups these six arguments in one object; the keywords
        are its compatibility spelling.  Every layout runs the same plans (three GEMMs on a
        trainable head where the loss separates, :mod:`pyfused_po.plans.fused_pairs`).

        **Groups of K responses** (:mod:`pyfused_po.modules.preference_groups`): with ``group_size=K`` (the
        module's, or a ``BatchLayout``'s) or ``group_index=[S]`` (a keyword of ``BatchLayout``; also
        accepted here) the ``S`` sequences (padded rows or packed sequences) form groups, and the
        call takes ``scores`` ``[S]`` (higher is preferred), the reference as ``ref_logps`` ``[S]``
        (or ``ref_token_logps``, ``ref_logits``, ``ref_hidden``) and ``nll_index`` ``[G]`` (per group
        the member whose NLL is added, weight ``nll_alpha``).  The loss is
        :func:`pyfused_po.listwise_preference_loss`'s: a listwise type, or any pair type as the mean
        over each group's ordered pairs; the result is a
        :class:`~pyfused_po.objectives.listwise_loss.ListwiseLossOutput` (``losses`` ``[G]``).  Every plan runs
        (staged, three GEMMs, frozen head; parallelism).
        """
        policy_source, ref_source = self._sources(logits, hidden, weight, bias, ref_logits, ref_hidden,
                                                  ref_weight, ref_bias)
        if labels is not None:  # small label dtypes widened once, for every stage (validation.checked_labels)
            labels = checked_labels("labels", labels, self.token_kwargs["ignore_index"])
        if nll_labels is not None:
            nll_labels = checked_labels("nll_labels", nll_labels, self.token_kwargs["ignore_index"])
        layout = BatchLayout.of(layout, cu_seqlens=cu_seqlens, position_ids=position_ids, pair_layout=pair_layout,
                                chosen_index=chosen_index, rejected_index=rejected_index, token_offset=token_offset,
                                group_index=group_index).with_group_size(self.group_size)
        check_group_call(self, layout, scores=scores, ref_logps=ref_logps, nll_index=nll_index,
                         ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps, weights=weights,
                         label_smoothing=label_smoothing, pair_layout=layout.pair_layout,
                         chosen_index=layout.chosen_index, rejected_index=layout.rejected_index)
        # The one representation: every layout is a stream of sequences grouped in pairs or in groups of K.
        batch = preference_batch(self, layout, policy_source, ref_source, labels, ref_logits=ref_logits,
                                 ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                                 ref_token_logps=ref_token_logps, token_weights=token_weights, nll_labels=nll_labels,
                                 scores=scores, ref_logps=ref_logps)
        policy_source, ref_source = batch.sources

        if layout.grouped:  # the listwise plan, checked once before any kernel
            plan = group_plan(self, batch, ref_logps, nll_index,
                              has_reference=any(x is not None for x in (ref_source, ref_token_logps, ref_logps)))

            def objective(columns):
                return group_objective(plan, columns, ref_logps)
        else:
            def objective(columns):
                return self._objective(columns, ref_chosen_logps, ref_rejected_logps, weights, label_smoothing)

        # The plan is asked on the batch, whatever its layout: three GEMMs where the loss separates.
        extras = self._policy_extras(layout.grouped)
        others = (ref_chosen_logps, ref_rejected_logps, ref_logps, token_weights, weights, label_smoothing)
        if isinstance(policy_source, tuple) and fused_pairs.applies(self, policy_source, others):
            fused = fused_pairs.fused_forward(
                self, batch, policy_source, extras=extras, objective=objective,
                reference=lambda: self._reference_tokens(batch, ref_source),
                capture=getattr(self, "token_capture", None))
            if fused is not None:  # None: a pair longer than the chunk budget
                return fused
        columns = self._sequence_columns(batch, policy_source, ref_source, extras)
        # Under sequence parallelism the sums are partial: one all-reduce makes them whole.
        return objective(self.parallel.reduce_columns(columns))

    def _run_tokens(self, batch, source, labels, extras=(), inplace=False):
        """The token stage of ``batch``: the padded batch through :meth:`_token_stage` (shift in the
        kernel), a packed stream with its labels already shifted."""
        if batch.packed:
            return run_token_stage(self, source, labels, extras=extras, inplace=inplace,
                                   token_kwargs=batch.token_kwargs)
        return self._token_stage(source, labels, extras=extras, inplace=inplace)

    def _reference_tokens(self, batch, ref_source):
        """The reference's per-token log-probs from ``ref_logits``/``ref_hidden`` (forward only), or None."""
        if ref_source is None or not self.needs_reference:
            return None
        with torch.no_grad():
            return self._run_tokens(batch, ref_source, batch.labels).logps

    def _sequence_columns(self, batch, policy_source, ref_source, extras):
        """The staged plan: token stage, then the batch's sequence stage (per-sequence sums over
        this process's tokens, :mod:`pyfused_po.sequence.preference_batch`)."""
        kl_tokens = None
        if self.expo:
            # One pass of the KL kernel gives the policy log-probs and KL(π_ref ‖ π_θ) per token.
            both = token_kl(policy_source, ref_source.detach(), batch.token_labels, with_logps=True,
                            **batch.token_kwargs)
            policy, kl_tokens = TokenLogprobs(both.logps), both.kl
        else:
            policy = self._run_tokens(batch, policy_source, batch.token_labels, extras=extras,
                                      inplace=self.inplace_backward)
        return batch.columns(policy, kl_tokens, self._reference_tokens(batch, ref_source))

    def _policy_extras(self, grouped=False):
        """The token stage's extras the objective reads (``logits/*`` metrics are pair metrics)."""
        mean_logit = self.logit_metrics and not grouped
        return (("mean_logit",) if mean_logit else ()) + (("log_sum_sq_probs",) if self.use_weighting else ())

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

