"""Groups of K responses end to end on the staged plan: logits (or hidden + LM head) → the
public token stage → per-sequence sums → :func:`pyfused_po.objectives.listwise_loss.listwise_preference_loss`.

Padded batches are ``[S, T, ·]`` with groups of consecutive rows (``group_size``) or any
rows (``group_index``); packed batches are one ``[1, N, ·]`` stream whose sequences,
delimited by ``cu_seqlens`` / ``position_ids``, are numbered in stream order.  Both
backends of the token stage apply (``backend=``).  This is the staged plan (a forward and a
backward pass over the logits, or four GEMMs on the fused-linear path);
:class:`~pyfused_po.FusedPreferenceLoss` with ``group_size=K`` runs the same losses through its
three-GEMM plan (:mod:`pyfused_po.modules.preference_groups`).
"""
import torch

from ..token.linear_token_logprobs import linear_token_logprobs
from ..objectives.listwise_loss import ListwiseLossOutput, listwise_plan
from ..sequence.packing import packed_layout
from ..sequence.sums import sequence_sums
from ..token.token_logprobs import token_logprobs
from ..validation import check_tensor


def _checked_plan(labels, cu_seqlens, position_ids, scores, references, loss_kwargs):
    """The :class:`~pyfused_po.objectives.listwise_loss.ListwisePlan` of this batch, every group and loss check
    run before the token stage launches; ``references``: {name: the reference input or None}."""
    check_tensor("labels", labels)
    packed = packed_layout(labels, cu_seqlens, position_ids)
    if packed is None and labels.dim() != 2:
        raise ValueError(f"padded labels must be [sequences, tokens], got shape {tuple(labels.shape)} "
                         f"(pass cu_seqlens= or position_ids= for a packed stream)")
    num_sequences = labels.shape[0] if packed is None else packed.num_sequences
    if scores is not None:
        check_tensor("scores", scores)
        if scores.device != labels.device:
            raise ValueError(f"scores must be on the device of the labels ({labels.device}), got {scores.device}")
    plan = listwise_plan(num_sequences, scores, **loss_kwargs)
    given = [name for name, x in references.items() if x is not None]
    if len(given) > 1:
        raise ValueError(f"pass one reference input, got {' and '.join(given)}")
    if plan.needs_reference and not given:
        raise ValueError(f"this loss_type needs a reference: pass one of {', '.join(references)}")
    return plan


def _loss_of_tokens(plan, token_logps, labels, ref_logps, ref_token_logps, compute_ref, *, ignore_index, shift,
                    cu_seqlens, position_ids):
    def sums_of(values):
        return sequence_sums(values, labels, ignore_index=ignore_index, shift=shift, cu_seqlens=cu_seqlens,
                             position_ids=position_ids)

    policy = sums_of(token_logps)
    ref = ref_logps
    if ref_token_logps is not None:
        ref = sums_of(ref_token_logps.detach()).logps
    elif compute_ref is not None:
        with torch.no_grad():
            ref = sums_of(compute_ref()).logps
    return plan.loss(policy.logps, ref, policy.lengths)


def listwise_loss_from_logits(logits, labels, scores, *, ref_logps=None, ref_logits=None, ref_token_logps=None,
                              ignore_index=-100, shift=False, temperature=1.0, backend="auto", cu_seqlens=None,
                              position_ids=None, **loss_kwargs) -> ListwiseLossOutput:
    """A listwise (or all-pairs) loss of groups of responses from their logits.

    Args:
        logits: ``[S, T, V]`` (padded, one row per sequence) or ``[1, N, V]`` / ``[N, V]`` with
            ``cu_seqlens`` ``[S + 1]`` or ``position_ids`` (packed).
        labels: token ids shaped like ``logits[..., 0]`` (``ignore_index`` marks prompt/padding).
        scores: ``[S]`` one score per sequence, higher is preferred.
        ref_logps / ref_logits / ref_token_logps: the reference as ``[S]`` sums, logits shaped like
            ``logits`` (run without gradient) or per-token log-probs shaped like ``labels``.
        ignore_index, shift, temperature, backend: as for :func:`pyfused_po.token_logprobs`.
        **loss_kwargs: ``group_size`` or ``group_index``, ``loss_type``, ``beta``, ``nll_index`` and the
            rest of :func:`pyfused_po.objectives.listwise_loss.listwise_preference_loss`.

    Every group, loss and reference check runs before the token stage launches.
    """
    plan = _checked_plan(labels, cu_seqlens, position_ids, scores, dict(
        ref_logps=ref_logps, ref_logits=ref_logits, ref_token_logps=ref_token_logps), loss_kwargs)

    def token_stage(x):
        return token_logprobs(x, labels, ignore_index=ignore_index, shift=shift, temperature=temperature,
                              backend=backend, cu_seqlens=cu_seqlens, position_ids=position_ids)

    compute_ref = None if ref_logits is None else (lambda: token_stage(ref_logits))
    return _loss_of_tokens(plan, token_stage(logits), labels, ref_logps, ref_token_logps, compute_ref,
                           ignore_index=ignore_index, shift=shift, cu_seqlens=cu_seqlens, position_ids=position_ids)


def listwise_loss_from_hidden(hidden, weight, labels, scores, *, bias=None, ref_logps=None, ref_hidden=None,
                              ref_weight=None, ref_bias=None, ref_token_logps=None, ignore_index=-100, shift=False,
                              temperature=1.0, backend="auto", impl="auto", chunk_tokens=None, cu_seqlens=None,
                              position_ids=None, **loss_kwargs) -> ListwiseLossOutput:
    """:func:`listwise_loss_from_logits` with ``logits = hidden @ weight.T (+ bias)`` never
    materialized (:func:`pyfused_po.linear_token_logprobs`).  ``ref_hidden`` runs through
    ``ref_weight`` / ``ref_bias`` (default: the policy's head, without gradient)."""
    def token_stage(h, w, b):
        return linear_token_logprobs(h, w, labels, bias=b, ignore_index=ignore_index, shift=shift,
                                     temperature=temperature, backend=backend, impl=impl, chunk_tokens=chunk_tokens,
                                     cu_seqlens=cu_seqlens, position_ids=position_ids)

    plan = _checked_plan(labels, cu_seqlens, position_ids, scores, dict(
        ref_logps=ref_logps, ref_hidden=ref_hidden, ref_token_logps=ref_token_logps), loss_kwargs)

    compute_ref = None
    if ref_hidden is not None:
        w = weight if ref_weight is None else ref_weight
        b = bias if ref_bias is None and ref_weight is None else ref_bias
        compute_ref = lambda: token_stage(ref_hidden, w.detach(), None if b is None else b.detach())  # noqa: E731
    return _loss_of_tokens(plan, token_stage(hidden, weight, bias), labels, ref_logps, ref_token_logps,
                           compute_ref, ignore_index=ignore_index, shift=shift, cu_seqlens=cu_seqlens,
                           position_ids=position_ids)
