"""Groups of K responses end to end on the staged plan: logits (or hidden + LM head) → the
public token stage → per-sequence sums → :func:`pyfused_po.listwise_loss.listwise_preference_loss`.

Padded batches are ``[S, T, ·]`` with groups of consecutive rows (``group_size``) or any
rows (``group_index``); packed batches are one ``[1, N, ·]`` stream whose sequences,
delimited by ``cu_seqlens`` / ``position_ids``, are numbered in stream order.  Both
backends of the token stage apply (``backend=``).  This is the staged plan (a forward and a
backward pass over the logits, or four GEMMs on the fused-linear path); the fused module's
three-GEMM plan takes groups once :class:`~pyfused_po.FusedPreferenceLoss` carries them.
"""
import torch

from .linear_token_logprobs import linear_token_logprobs
from .listwise_loss import ListwiseLossOutput, listwise_preference_loss
from .sequence import sequence_sums
from .token_logprobs import token_logprobs


def _reference_sums(ref_logps, ref_token_logps, compute_ref, sums_of):
    """``[S]`` reference sums from exactly one of the three reference inputs (or None)."""
    given = [name for name, x in (("ref_logps", ref_logps), ("ref_token_logps", ref_token_logps),
                                  ("ref_logits/ref_hidden", compute_ref)) if x is not None]
    if len(given) > 1:
        raise ValueError(f"pass one reference input, got {' and '.join(given)}")
    if ref_token_logps is not None:
        return sums_of(ref_token_logps.detach()).logps
    if compute_ref is not None:
        with torch.no_grad():
            return sums_of(compute_ref()).logps
    return ref_logps


def _loss_of_tokens(token_logps, labels, scores, ref_logps, ref_token_logps, compute_ref, *, ignore_index, shift,
                    cu_seqlens, position_ids, loss_kwargs):
    def sums_of(values):
        return sequence_sums(values, labels, ignore_index=ignore_index, shift=shift, cu_seqlens=cu_seqlens,
                             position_ids=position_ids)

    policy = sums_of(token_logps)
    ref = _reference_sums(ref_logps, ref_token_logps, compute_ref, sums_of)
    return listwise_preference_loss(policy.logps, ref, scores, lengths=policy.lengths, **loss_kwargs)


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
            rest of :func:`pyfused_po.listwise_loss.listwise_preference_loss`.
    """
    def token_stage(x):
        return token_logprobs(x, labels, ignore_index=ignore_index, shift=shift, temperature=temperature,
                              backend=backend, cu_seqlens=cu_seqlens, position_ids=position_ids)

    compute_ref = None if ref_logits is None else (lambda: token_stage(ref_logits))
    return _loss_of_tokens(token_stage(logits), labels, scores, ref_logps, ref_token_logps, compute_ref,
                           ignore_index=ignore_index, shift=shift, cu_seqlens=cu_seqlens, position_ids=position_ids,
                           loss_kwargs=loss_kwargs)


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

    compute_ref = None
    if ref_hidden is not None:
        w = weight if ref_weight is None else ref_weight
        b = bias if ref_bias is None and ref_weight is None else ref_bias
        compute_ref = lambda: token_stage(ref_hidden, w.detach(), None if b is None else b.detach())  # noqa: E731
    return _loss_of_tokens(token_stage(hidden, weight, bias), labels, scores, ref_logps, ref_token_logps,
                           compute_ref, ignore_index=ignore_index, shift=shift, cu_seqlens=cu_seqlens,
                           position_ids=position_ids, loss_kwargs=loss_kwargs)
