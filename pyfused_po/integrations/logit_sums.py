"""Each position's sum of logits over the vocabulary, without forming the logits.

Trainers that score tokens themselves log the mean or the sum of *every* logit of a batch
(prompt and padding positions included) as a metric.  For a linear head
``z_v = (h · W_v + b_v) · scale``::

    Σ_v z_v = (h · Σ_v W_v + Σ_v b_v) · scale

so one ``[D]`` column sum of the head stands in for the ``[rows, seq, vocab]`` logits.  The
identity needs a linear head: a final logit softcap (Gemma 2/3) is refused by name.
"""
import torch

__all__ = ["vocab_logit_sums"]


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
