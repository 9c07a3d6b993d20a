"""KTO (Ethayarajh et al., 2024): unpaired preference loss, in TRL's KTOTrainer form.

Per example with r = ℓ − ℓʳ and the detached reference point z₀ = max(0, KL estimate):

* desirable:   λ_D·(1 − σ(β(r − z₀)))
* undesirable: λ_U·(1 − σ(β(z₀ − r)))

``loss_type="apo_zero_unpaired"`` uses 1 − σ(βr) and σ(βr) instead (no z₀).
The KL estimate comes from *mismatched* pairs (a completion scored under another
example's prompt); computing those log-probs is the caller's (e.g. with
:func:`pyfused_po.token_logprobs` under ``torch.no_grad()``): pass them, or the scalar.

:class:`FusedKTOLoss` takes the policy as ``logits=`` or, logits never materialized, as
``hidden=`` with the LM head ``weight=`` (``bias=``) through
:func:`pyfused_po.linear_token_logprobs`; padded ``[B, T]`` or packed (``cu_seqlens=``).
"""
from dataclasses import dataclass
from typing import Dict

import torch
from torch import nn

from ..plans import fused_kto
from ..sequence.batch_layout import BatchLayout
from ..distributed.options import ParallelOptions
from ..plans.head_source import check_head_shapes, check_invariant_options, resolve_sources, run_token_stage
from ..sequence.kto_batch import kto_batch
from ..token.linear_token_logprobs import IMPLS
from ..objectives.checks import check_number
from ..validation import (
    as_number,
    check_exclusive,
    check_positive,
    check_same_device,
    check_shape,
    check_tensor,
    checked_labels,
)

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
REDUCTIONS = ("mean", "sum", "none")


@dataclass
class KTOLossOutput:
    """``loss`` reduced over examples; ``losses`` per example (input order); ``rewards`` β·r
    per example (detached); ``metrics`` under TRL's names."""

    loss: torch.Tensor
    losses: torch.Tensor
    rewards: torch.Tensor
    metrics: Dict[str, torch.Tensor]


def _kl_estimate(kl, policy_kl_logps, ref_kl_logps, like, wide):
    check_exclusive("KL estimate", kl=kl, **{
        "policy_kl_logps/ref_kl_logps": policy_kl_logps if policy_kl_logps is not None else ref_kl_logps})
    if kl is not None:
        if isinstance(kl, torch.Tensor):
            if kl.numel() != 1:
                raise ValueError(f"kl must be a number or a one-element tensor, got shape {tuple(kl.shape)}")
            value = kl.detach().reshape(()).to(device=like.device, dtype=wide)
        else:
            kl = as_number("kl", kl)  # NumPy scalars are numbers
            check_number("kl", kl)
            value = torch.tensor(float(kl), dtype=wide, device=like.device)
    elif policy_kl_logps is not None or ref_kl_logps is not None:
        if policy_kl_logps is None or ref_kl_logps is None:
            raise ValueError("pass policy_kl_logps and ref_kl_logps together")
        check_tensor("policy_kl_logps", policy_kl_logps, floating=True)
        check_tensor("ref_kl_logps", ref_kl_logps, floating=True)
        check_shape("ref_kl_logps", ref_kl_logps, policy_kl_logps.shape, "like policy_kl_logps")
        check_same_device(policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps, policy_logps=like)
        diff = (policy_kl_logps.detach().to(wide) - ref_kl_logps.detach().to(wide))
        value = diff.mean() if diff.numel() else torch.zeros((), dtype=wide, device=like.device)
    else:
        value = torch.zeros((), dtype=wide, device=like.device)
    return value.clamp(min=0.0)


def kto_loss(policy_logps, ref_logps, is_desirable, *, beta=0.1, kl=None, policy_kl_logps=None,
             ref_kl_logps=None, desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto",
             reduction="mean") -> KTOLossOutput:
    """KTO from summed per-sequence log-probs.

    Args:
        policy_logps, ref_logps: ``[B]`` summed log-probs of each completion.
        is_desirable: ``[B]`` bool, True for desirable (thumbs-up) completions.
        kl: the KL estimate (number or one-element tensor), or ``policy_kl_logps`` and
            ``ref_kl_logps`` (``[M]`` summed log-probs of mismatched completions) from which
            z₀ = max(0, mean(policy_kl_logps − ref_kl_logps)) is taken; neither: z₀ = 0.
            z₀ is always detached.
        desirable_weight, undesirable_weight: λ_D, λ_U.
        loss_type: ``"kto"`` or ``"apo_zero_unpaired"``.
        reduction: ``"mean"`` over examples (TRL), ``"sum"`` or ``"none"``.

    Returns:
        :class:`KTOLossOutput`; metrics ``kl``, ``rewards/chosen``, ``rewards/rejected``
        (means over each group, 0 when empty), ``rewards/chosen_sum``, ``rewards/rejected_sum``,
        ``logps/chosen_sum``, ``logps/rejected_sum``, ``count/chosen``, ``count/rejected``.
    """
    beta, desirable_weight, undesirable_weight = (as_number(n, v) for n, v in (
        ("beta", beta), ("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)))
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {KTO_LOSS_TYPES}, got {loss_type!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_positive("beta", beta)
    check_number("desirable_weight", desirable_weight)
    check_number("undesirable_weight", undesirable_weight)
    check_tensor("policy_logps", policy_logps, floating=True)
    if policy_logps.dim() != 1:
        raise ValueError(f"policy_logps must be 1-D [examples], got shape {tuple(policy_logps.shape)}")
    check_tensor("ref_logps", ref_logps, floating=True)
    check_shape("ref_logps", ref_logps, policy_logps.shape, "one value per example, like policy_logps")
    if not isinstance(is_desirable, torch.Tensor) or is_desirable.dtype != torch.bool:
        raise TypeError(f"is_desirable must be a bool tensor, got "
                        f"{is_desirable.dtype if isinstance(is_desirable, torch.Tensor) else type(is_desirable).__name__}")
    check_shape("is_desirable", is_desirable, policy_logps.shape, "one flag per example")
    check_same_device(policy_logps=policy_logps, ref_logps=ref_logps, is_desirable=is_desirable)
    wide = torch.float64 if policy_logps.dtype == torch.float64 else torch.float32
    logps = policy_logps.to(wide)
    logratio = logps - ref_logps.detach().to(wide)
    if loss_type == "kto":
        z0 = _kl_estimate(kl, policy_kl_logps, ref_kl_logps, policy_logps, wide)
        desirable = 1.0 - torch.sigmoid(beta * (logratio - z0))
        undesirable = 1.0 - torch.sigmoid(beta * (z0 - logratio))
    else:
        z0 = torch.zeros((), dtype=wide, device=logps.device)
        desirable = 1.0 - torch.sigmoid(beta * logratio)
        undesirable = torch.sigmoid(beta * logratio)
    losses = torch.where(is_desirable, desirable_weight * desirable, undesirable_weight * undesirable)
    if reduction == "mean":
        loss = losses.sum() / max(losses.numel(), 1)
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses
    rewards = (beta * logratio).detach()
    zero = torch.zeros((), dtype=wide, device=logps.device)
    n_chosen = is_desirable.sum().to(wide)
    n_rejected = (~is_desirable).sum().to(wide)
    chosen_sum = torch.where(is_desirable, rewards, zero).sum()
    rejected_sum = torch.where(is_desirable, zero, rewards).sum()
    metrics = {
        "kl": z0.detach(),
        "rewards/chosen": chosen_sum / n_chosen.clamp(min=1.0),
        "rewards/rejected": rejected_sum / n_rejected.clamp(min=1.0),
        "rewards/chosen_sum": chosen_sum,
        "rewards/rejected_sum": rejected_sum,
        "logps/chosen_sum": torch.where(is_desirable, logps.detach(), zero).sum(),
        "logps/rejected_sum": torch.where(is_desirable, zero, logps.detach()).sum(),
        "count/chosen": n_chosen,
        "count/rejected": n_rejected,
    }
    return KTOLossOutput(loss, losses, rewards, metrics)


class FusedKTOLoss(nn.Module):
    """KTO straight from logits — or from hidden states and the LM head, the logits never
    materialized: token stage → per-sequence sums → :func:`kto_loss`.

    Args:
        beta, desirable_weight, undesirable_weight, loss_type, reduction: as :func:`kto_loss`.
        ignore_index, shift, temperature, logit_scale, softcap, backend, inplace_backward:
            as :func:`pyfused_po.token_logprobs`.
        linear_impl: for ``hidden=``/``weight=`` inputs, the fused-linear implementation
            (``"auto"``, ``"chunked"`` or ``"fused"``; see :func:`pyfused_po.linear_token_logprobs`).
        vocab_parallel_group, vocab_start, sequence_parallel_group: as in
            :class:`pyfused_po.FusedPreferenceLoss`.  Under sequence parallelism ``logits``
            (or ``hidden``), ``labels`` and ``ref_logits`` (or ``ref_hidden``) are this rank's
            token slices, ``ref_logps`` holds full per-sequence sums, and ``policy_kl_logps`` /
            ``ref_kl_logps`` are this rank's partial sums, summed over the group (same
            all-reduce) before the KL estimate is taken.
        batch_invariant: the token stage's bitwise batch invariance, on the staged plan; as in
            :class:`pyfused_po.FusedPreferenceLoss`.
    """

    def __init__(self, beta=0.1, *, desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto",
                 reduction="mean", ignore_index=-100, shift=False, temperature=1.0, logit_scale=1.0,
                 softcap=None, backend="auto", inplace_backward=False, linear_impl="auto",
                 vocab_parallel_group=None, vocab_start=None, sequence_parallel_group=None, batch_invariant=False):
        super().__init__()
        beta, desirable_weight, undesirable_weight = (as_number(n, v) for n, v in (
            ("beta", beta), ("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)))
        check_positive("beta", beta)
        check_number("desirable_weight", desirable_weight)
        check_number("undesirable_weight", undesirable_weight)
        if loss_type not in KTO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {KTO_LOSS_TYPES}, got {loss_type!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.loss_kwargs = dict(beta=beta, desirable_weight=desirable_weight,
                                undesirable_weight=undesirable_weight, loss_type=loss_type, reduction=reduction)
        self.token_kwargs = dict(ignore_index=ignore_index, shift=shift, temperature=temperature,
                                 logit_scale=logit_scale, softcap=softcap, backend=backend)
        self.inplace_backward = inplace_backward
        if linear_impl not in IMPLS:
            raise ValueError(f"linear_impl must be one of {IMPLS}, got {linear_impl!r}")
        self.linear_impl = linear_impl
        self.parallel = ParallelOptions(vocab_parallel_group, vocab_start, sequence_parallel_group)
        self.parallel.check_sequence_parallel(shift=shift)
        self.batch_invariant = check_invariant_options("FusedKTOLoss", batch_invariant, self.parallel)

    # hidden=/weight= inputs: form the exact gradient during the forward (three GEMMs instead of
    # four, two for a frozen head; :mod:`pyfused_po.plans.fused_kto`).  False: the staged plan.
    fused_gradient = True
    # A sequence with more labelled tokens than the plan's chunk: "staged" (4 GEMMs, logged once) or
    # "three_gemm" (a chunk as long as the sequence); as FusedPreferenceLoss.long_group_plan.
    long_group_plan = "staged"
    fallback_reason = None

    def forward(self, logits=None, labels=None, is_desirable=None, ref_logps=None, ref_logits=None, *,
                hidden=None, weight=None, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                kl=None, policy_kl_logps=None, ref_kl_logps=None, cu_seqlens=None, position_ids=None,
                token_offset=None, layout=None) -> KTOLossOutput:
        """``logits`` ``[B, T, V]`` or ``hidden`` ``[B, T, D]`` with the LM head ``weight``
        ``[V, D]`` (and ``bias`` ``[V]``); ``labels`` ``[B, T]``, ``is_desirable`` ``[B]`` bool.
        The reference as ``ref_logps`` ``[B]``, ``ref_logits`` like ``logits``, or ``ref_hidden``
        with ``ref_weight``/``ref_bias`` (default: the policy's head, detached); logits or hidden
        states run forward only, no gradient.  The KL estimate as in :func:`kto_loss`.  Packed:
        ``logits`` ``[1, N, V]`` (``hidden`` ``[1, N, D]``), ``labels`` ``[1, N]`` with ``cu_seqlens``
        ``[S + 1]`` or ``position_ids``; ``is_desirable`` / ``ref_logps`` are ``[S]``, one per packed
        sequence (:mod:`pyfused_po.sequence.packing`).  ``layout=`` (a :class:`~pyfused_po.BatchLayout` with
        ``cu_seqlens`` / ``position_ids`` / ``token_offset``) is the same as those keywords; a KTO
        sequence is a group of one, so it takes no pair layout."""
        layout = BatchLayout.of(layout, cu_seqlens=cu_seqlens, position_ids=position_ids, token_offset=token_offset)
        if layout.pair_layout is not None or layout.chosen_index is not None or layout.rejected_index is not None \
                or layout.grouped:
            raise ValueError("FusedKTOLoss takes no pair layout or groups (each sequence is scored alone): pass a "
                             "BatchLayout with cu_seqlens / position_ids / token_offset only")
        cu_seqlens, position_ids, token_offset = layout.cu_seqlens, layout.position_ids, layout.token_offset
        source, ref_source = resolve_sources("FusedKTOLoss", logits, hidden, weight, bias, ref_logits, ref_hidden,
                                             ref_weight, ref_bias)
        if labels is None or is_desirable is None:
            raise ValueError("FusedKTOLoss.forward needs labels= and is_desirable= (and logits= or hidden=)")
        labels = checked_labels("labels", labels, self.token_kwargs["ignore_index"])
        if labels.dim() != 2 and cu_seqlens is None and position_ids is None:
            raise ValueError(f"labels must be [batch, seq], got shape {tuple(labels.shape)}")
        if (ref_logps is None) == (ref_source is None):
            raise ValueError("pass exactly one of ref_logps, ref_logits and ref_hidden")
        if ref_logits is not None and logits is not None and tuple(ref_logits.shape) != tuple(logits.shape):
            raise ValueError(f"ref_logits must have the shape of logits {tuple(logits.shape)}, "
                             f"got {tuple(ref_logits.shape)}")
        if ref_logits is not None and logits is None and tuple(ref_logits.shape[:-1]) != tuple(labels.shape):
            raise ValueError(f"ref_logits must have shape labels.shape + (vocab,) = {tuple(labels.shape)} + (·,), "
                             f"got {tuple(ref_logits.shape)}")
        check_head_shapes(source, labels)
        check_head_shapes(ref_source, labels, prefix="ref_")
        if ref_logits is not None:
            ref_source = ref_logits.detach()
        # The one representation: a stream of sequences, each a group of one (padded or packed).
        batch = kto_batch(self, layout, source, ref_source, labels, is_desirable)
        if fused_kto.applies(self, source, token_offset):
            fused = fused_kto.fused_forward(
                self, batch, ref_logps,
                lambda policy, ref: kto_loss(policy, ref, is_desirable, kl=kl, policy_kl_logps=policy_kl_logps,
                                             ref_kl_logps=ref_kl_logps, **self.loss_kwargs))
            if fused is not None:  # None: a sequence longer than the chunk budget
                return fused
        source, ref_source = batch.sources
        policy = run_token_stage(self, source, batch.token_labels, inplace=self.inplace_backward,
                                 token_kwargs=batch.token_kwargs).logps
        columns = {"policy": batch.sums(policy)}
        if ref_source is not None:
            with torch.no_grad():
                ref = run_token_stage(self, ref_source, batch.token_labels, token_kwargs=batch.token_kwargs).logps
            columns["ref"] = batch.sums(ref)
        if policy_kl_logps is not None and ref_kl_logps is not None:
            # Under sequence parallelism these are this rank's partial sums of the mismatched pairs.
            columns["policy_kl"], columns["ref_kl"] = policy_kl_logps.detach(), ref_kl_logps.detach()
        total = self.parallel.reduce_columns(columns)  # one all-reduce under sequence parallelism
        if ref_source is not None:
            ref_logps = total["ref"].detach()
        if "policy_kl" in total:
            policy_kl_logps, ref_kl_logps = total["policy_kl"], total["ref_kl"]
        return kto_loss(total["policy"], ref_logps, is_desirable, kl=kl, policy_kl_logps=policy_kl_logps,
                        ref_kl_logps=ref_kl_logps, **self.loss_kwargs)
