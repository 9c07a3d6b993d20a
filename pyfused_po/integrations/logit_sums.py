"""Each position's sum of logits over the vocabulary, without forming the logits.

Trainers that score tokens themselves log the mean or the sum of *every* logit of a batch
(prompt and padding positions included) as a metric.  For a linear head
``z_v = (h · W_v + b_v) · scale``::

    Σ_v z_v = (h · Σ_v W_v + Σ_v b_v) · scale

so one ``[D]`` column sum of the head stands in for the ``[rows, seq, vocab]`` logits.  The
identity needs a linear head: a final logit softcap (Gemma 2/3) is refused by name.
:func:`scored_rows` runs a causal LM whose forward answers ``pyfused_po_head=``
(:func:`.trl_legacy_head.install_forward`) and returns those statistics with the labels' log-probs.
"""
import torch

from ..token.linear_token_logprobs import linear_token_logprobs
from .trl_legacy_head import run_head

__all__ = ["scored_rows", "vocab_logit_sums"]


def vocab_logit_sums(hidden, weight, bias, transform, who):
    """``[..., T]`` float32 ``Σ_v logits`` at each position of ``hidden`` ``[..., T, D]`` for the
    head ``weight`` ``[V, D]`` (+ ``bias`` ``[V]``) and ``transform`` (:func:`.hf.lm_head_transform`);
    computed in float64 without gradient (a metric only).  ``who`` names the caller in the error
    raised for a softcapped head."""
    if transform["softcap"] is not None:
        raise ValueError(f"{who} reproduces the trainer's logit metrics through a linear head; this model's config "
                         "has a final logit softcap (final_logit_softcapping), for which Σ_v logits needs the logits")
    with torch.no_grad():
        sums = hidden.detach().double() @ weight.detach().double().sum(0)
        if bias is not None:
            sums = sums + bias.detach().double().sum()
        return (sums * transform["logit_scale"]).float()


def scored_rows(model, inputs, labels, *, backend, impl, metric, who):
    """``(per-token log-probs [R, T], per-position logit stats [R, T])`` of a padded batch:
    ``model(**inputs)`` runs its backbone only; the log-prob of ``labels[:, t]`` comes from hidden
    row ``t - 1`` (0 where the label is -100, and at ``t = 0``), through
    :func:`pyfused_po.linear_token_logprobs`; each position's Σ_v logits (``metric="sum"``) or mean
    over the vocabulary (``"mean"``), from :func:`vocab_logit_sums`."""

    def stage(hidden, targets, weight, bias, transform):
        sums = vocab_logit_sums(hidden, weight, bias, transform, who)
        logps = linear_token_logprobs(hidden, weight, targets, bias=bias, shift=True, backend=backend, impl=impl,
                                      **transform)
        return logps, sums / weight.shape[0] if metric == "mean" else sums

    def head(causal_lm, hidden):
        return run_head(causal_lm, hidden, labels, stage)

    return model(**inputs, use_cache=False, pyfused_po_head=head)
