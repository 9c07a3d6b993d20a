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

With ``top_k`` / ``top_p`` / ``min_p`` it scores the tokens under the *truncated* distribution the
sampler drew from (:mod:`pyfused_po.token.truncated_support`), so that ``π_train / π_sampler`` compares
like with like; ``batch_invariant=True`` makes a token's results bitwise independent of the rest of
the batch (:mod:`pyfused_po.token.torch_backend.invariant_tiles`).
"""
import torch

from ..token.linear_token_logprobs import linear_token_logprobs
from ..token.token_logprobs import token_logprobs
from ..token.truncated_logprobs import check_sources, truncated_token_logprobs
from ..token.truncated_support import sampler_spec
from .rl_ratio import ImportanceRatio, importance_ratio

__all__ = ["rl_token_logprobs", "log_probs_from_logits", "logprobs_from_logits", "entropy_from_logits",
           "importance_ratio", "ImportanceRatio"]


def rl_token_logprobs(labels, *, logits=None, hidden=None, weight=None, bias=None, temperature=1.0,
                      with_entropy=False, shift=False, ignore_index=-100, logit_scale=1.0, softcap=None,
                      backend="auto", cu_seqlens=None, position_ids=None, top_k=None, top_p=None, min_p=None,
                      sampler_order="hf", batch_invariant=False, return_outside=False):
    """Per-token ``log softmax(z / T)[label]`` and, with ``with_entropy``, ``H(softmax(z / T))``.

    With ``top_k`` / ``top_p`` / ``min_p`` (``None``: off) the distribution is the sampler's
    truncated one, ``p̃ = softmax(z / T)`` restricted to the kept set and renormalized: top-k keeps
    values ≥ the k-th largest (ties kept), top-p then keeps the smallest descending prefix of the
    renormalized top-k distribution whose mass reaches ``top_p`` (ties with its last value kept),
    min-p then keeps ``p̃_v ≥ min_p · max p̃`` (Hugging Face's warper order; ``sampler_order="vllm"``
    applies min-p first, as vLLM's v1 sampler does).  A label outside the kept set gives ``−inf``;
    the entropy is ``H(p̃)``; the gradient is ``(onehot − p̃)/T`` on the kept set (held fixed) and 0
    elsewhere.  ``batch_invariant=True``: a token's log-prob, entropy and gradient row are bitwise
    the same whatever else is in the batch (with truncation: fixed-shape tiles of
    :mod:`pyfused_po.token.truncated_logprobs`; without: the token stage's own invariant mode,
    :func:`pyfused_po.token_logprobs` / :func:`pyfused_po.linear_token_logprobs`).  Truncation runs
    tile by tile (PyTorch gathers / GEMMs); each tile is folded by PyTorch or, on the Triton
    backend, by the radix-select kernels of ``kernels/truncated_select.py``.  ``return_outside=True``
    appends a bool mask, shaped like ``labels``, of the labelled tokens outside the kept set.

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
    without ``with_entropy``; ``(log_probs, entropy, outside)`` with ``return_outside``.
    Bad ``temperature`` / ``top_k`` / ``top_p`` / ``min_p`` raise ``ValueError`` before any kernel.
    """
    spec = sampler_spec(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, order=sampler_order)
    check_sources("rl_token_logprobs", logits, hidden, weight, bias)
    if spec.truncates:
        out = truncated_token_logprobs(
            labels, logits=logits, hidden=hidden, weight=weight, bias=bias, temperature=temperature, top_k=top_k,
            top_p=top_p, min_p=min_p, order=sampler_order, with_entropy=with_entropy, shift=shift,
            ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap, backend=backend,
            batch_invariant=batch_invariant, cu_seqlens=cu_seqlens, position_ids=position_ids)
        return (out.logps, out.entropy, out.outside) if return_outside else (out.logps, out.entropy)
    kw = dict(ignore_index=ignore_index, shift=shift, temperature=temperature, logit_scale=logit_scale,
              softcap=softcap, extras=("entropy",) if with_entropy else (), backend=backend,
              cu_seqlens=cu_seqlens, position_ids=position_ids, batch_invariant=batch_invariant)
    if logits is not None:
        out = token_logprobs(logits, labels, **kw)
    else:
        out = linear_token_logprobs(hidden, weight, labels, bias=bias, **kw)
    logps, entropy = (out.logps, out.entropy) if with_entropy else (out, None)
    if return_outside:  # nothing is truncated: every labelled token is inside the support
        return logps, entropy, torch.zeros(logps.shape, dtype=torch.bool, device=logps.device)
    return logps, entropy


def log_probs_from_logits(logits, labels, temperature=1.0, *, top_k=None, top_p=None, min_p=None):
    """OpenRLHF's ``log_probs_from_logits(logits, labels, temperature)``: ``log softmax(logits / T)``
    at ``labels`` (aligned with the rows of ``logits``), without dividing ``logits`` in place.
    ``top_k`` / ``top_p`` / ``min_p``: the sampler's truncation (see :func:`rl_token_logprobs`)."""
    return rl_token_logprobs(labels, logits=logits, temperature=temperature, top_k=top_k, top_p=top_p,
                             min_p=min_p)[0]


def logprobs_from_logits(logits, labels, inplace_backward=True, *, top_k=None, top_p=None, min_p=None):
    """verl's ``logprobs_from_logits(logits, labels)`` (``logits`` already divided by the temperature
    by the caller).  ``inplace_backward`` is accepted for signature compatibility and ignored.
    ``top_k`` / ``top_p`` / ``min_p``: the sampler's truncation (see :func:`rl_token_logprobs`)."""
    del inplace_backward
    return rl_token_logprobs(labels, logits=logits, top_k=top_k, top_p=top_p, min_p=min_p)[0]


def entropy_from_logits(logits):
    """verl's / OpenRLHF's ``entropy_from_logits(logits)`` / ``compute_entropy(logits)``:
    ``H(softmax(logits))`` per row, float32."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return rl_token_logprobs(labels, logits=logits, with_entropy=True)[1]
