"""RL log-probs: per-token log-probs (and entropy) at a sampling temperature, as RL frameworks use them.

PPO / GRPO / RLOO actors score the sampled tokens under ``softmax(logits / T)`` — the
distribution they were sampled from — and log its entropy.  verl does it with
``logprobs_from_logits(logits / T, labels)`` and ``entropy_from_logits(logits / T)``
(``verl.utils.torch_functional``), OpenRLHF with ``log_probs_from_logits(logits, labels, T)``
(``openrlhf.models.utils``, which divides ``logits`` in place).  Each of those materializes an
fp32 ``[tokens, vocab]`` intermediate and, for the entropy, a softmax of the same size.

:func:`rl_token_logprobs` computes both in one fused pass, from logits or — the logits never
formed — from hidden states and the LM head.  :func:`log_probs_from_logits`,
:func:`logprobs_from_logits` and :func:`entropy_from_logits` are drop-ins with those
frameworks' signatures and semantics (labels aligned with the logits rows, every label scored;
nothing modified in place).
"""
from ..linear_token_logprobs import linear_token_logprobs
from ..token_logprobs import token_logprobs

__all__ = ["rl_token_logprobs", "log_probs_from_logits", "logprobs_from_logits", "entropy_from_logits"]


def rl_token_logprobs(labels, *, logits=None, hidden=None, weight=None, bias=None, temperature=1.0,
                      with_entropy=False, shift=False, ignore_index=-100, logit_scale=1.0, softcap=None,
                      backend="auto", cu_seqlens=None, position_ids=None):
    """Per-token ``log softmax(z / T)[label]`` and, with ``with_entropy``, ``H(softmax(z / T))``.

    Exactly one source: ``logits`` ``[..., T, V]``, or ``hidden`` ``[..., T, D]`` with the LM head
    ``weight`` ``[V, D]`` (and ``bias``), the logits never materialized.  ``z`` is the logits after
    the model's transform (``softcap(x · logit_scale)``, see
    :func:`pyfused_po.integrations.hf.lm_head_transform`).  ``labels`` ``[..., T]``: the token at
    each row (``shift=False``, as verl and OpenRLHF pass them: ``labels = input_ids[:, 1:]`` with
    ``logits[:, :-1]``), or the input ids with row ``t`` predicting ``t + 1`` (``shift=True``; results stay aligned with
    ``labels``, position 0 gives 0).
    Positions labelled ``ignore_index`` give 0.  A packed stream (``[1, N]`` labels, several
    sequences in one row) is delimited by ``cu_seqlens`` ``[S + 1]`` or ``position_ids`` (see
    README "Packed sequences"): ``shift=True`` then never predicts across a boundary.  Gradients
    flow to the logits (or hidden states and head) through the log-probs and the entropy (an
    entropy bonus).

    Returns ``(log_probs, entropy)``, float32 shaped like ``labels``; ``entropy`` is ``None``
    without ``with_entropy``.
    """
    if (logits is None) == (hidden is None):
        raise ValueError("rl_token_logprobs needs exactly one of logits= or hidden= (with weight=), got "
                         f"{'both' if logits is not None else 'neither'}")
    if hidden is not None and weight is None:
        raise ValueError("hidden= needs weight= (the LM head, [vocab, hidden_dim])")
    if logits is not None and (weight is not None or bias is not None):
        raise ValueError("weight=/bias= go with hidden=, not with logits=")
    kw = dict(ignore_index=ignore_index, shift=shift, temperature=temperature, logit_scale=logit_scale,
              softcap=softcap, extras=("entropy",) if with_entropy else (), backend=backend,
              cu_seqlens=cu_seqlens, position_ids=position_ids)
    if logits is not None:
        out = token_logprobs(logits, labels, **kw)
    else:
        out = linear_token_logprobs(hidden, weight, labels, bias=bias, **kw)
    return (out.logps, out.entropy) if with_entropy else (out, None)


def log_probs_from_logits(logits, labels, temperature=1.0):
    """OpenRLHF's ``log_probs_from_logits(logits, labels, temperature)``: ``log softmax(logits / T)``
    at ``labels`` (aligned with the rows of ``logits``), without dividing ``logits`` in place."""
    return rl_token_logprobs(labels, logits=logits, temperature=temperature)[0]


def logprobs_from_logits(logits, labels, inplace_backward=True):
    """verl's ``logprobs_from_logits(logits, labels)`` (``logits`` already divided by the temperature
    by the caller).  ``inplace_backward`` is accepted for signature compatibility and ignored."""
    del inplace_backward
    return rl_token_logprobs(labels, logits=logits)[0]


def entropy_from_logits(logits):
    """verl's / OpenRLHF's ``entropy_from_logits(logits)`` / ``compute_entropy(logits)``:
    ``H(softmax(logits))`` per row, float32."""
    import torch

    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return rl_token_logprobs(labels, logits=logits, with_entropy=True)[1]
