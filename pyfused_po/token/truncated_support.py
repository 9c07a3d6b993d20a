"""Truncated support: the per-row math of log-probs under the distribution a sampler drew from.

A sampler with temperature ``T`` and top-k / top-p / min-p does not draw from
``p = softmax(z)`` (``z`` the logits after the model's transform and ``/ T``) but from

    p̃_v = exp(z_v) / Σ_{u ∈ K} exp(z_u)   for v in the kept set K,   0 elsewhere.

K is built in the sampler's order (``order="hf"``, Hugging Face's warpers
``TopK → TopP → MinP`` after ``Temperature``):

* top-k: keep ``z_v ≥`` the k-th largest ``z`` (ties with it kept: ``TopKLogitsWarper``);
* top-p on the distribution renormalized over what top-k kept: sort the kept values in
  descending order and keep the smallest prefix whose mass reaches ``p`` (token ``i`` is kept
  when the mass strictly before it is ``< p``; ``TopPLogitsWarper`` writes the same rule as
  "ascending cumulative mass ``> 1 − p``");
* min-p: keep ``p̃_v ≥ min_p · max_u p̃_u``, i.e. ``exp(z_v − max z) ≥ min_p`` (the ratio does not
  depend on the normalization, and the maximum is always kept).

``order="vllm"`` applies min-p first (vLLM's v1 sampler: temperature, then the argmax-invariant
min-p processor, then ``apply_top_k_top_p``); top-p then runs on the min-p-truncated distribution, so
the two orders can keep different sets when both min-p and top-p are on.  vLLM's PyTorch
``apply_top_k_top_p`` uses the same top-k (``logits < k-th value`` removed: ties kept) and top-p
(ascending cumulative mass ``≤ 1 − p`` removed) rules as Hugging Face.  On CUDA vLLM may sample
through FlashInfer's rejection samplers instead, which are only *statistically* equivalent; their
exact kept set was not checked here.  vLLM reports untruncated log-probs unless
``logprobs_mode="processed_logprobs"``.

Every rule keeps an *upper set* of the row's values, so K is ``{v : z_v ≥ τ}`` for one value
τ per row, and top-p ties at the boundary are kept whole (a sort-order rule would keep an arbitrary
subset of equal values: Hugging Face's and vLLM's torch sorts are not stable). Everything is
computed on ``d = z − max z`` (:func:`pyfused_po.token.torch_backend.token.row_stats`: exact near the max at
any logit offset) and a row is summarized by two numbers, ``τ`` and ``log s̃ = log Σ_{K} e^{d}``.
The backward rebuilds K from ``τ`` (``d`` is recomputed bitwise: a max and elementwise ops), so the
kept set is held fixed:

    ∂ log p̃_y / ∂z = onehot(y) − p̃       (zero outside K),    ∂H(p̃)/∂z_v = −p̃_v (log p̃_v + H)

and ``∂z/∂x`` (``1/T`` times the softcap's derivative) is applied last.  A label outside K gives
``log p̃ = −inf`` and no gradient (its value is constant while K is held fixed).
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .torch_backend.token import _transform_grad, row_stats
from ..validation import as_number

ORDERS = ("hf", "vllm")


@dataclass(frozen=True)
class SamplerSpec:
    """The truncation a sampler applied after its temperature; ``None`` = that rule is off."""

    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    order: str = "hf"

    @property
    def truncates(self) -> bool:
        """Whether any rule can remove a token (top_p = 1 and min_p = 0 cannot)."""
        return self.top_k is not None or (self.top_p is not None and self.top_p < 1.0) or bool(self.min_p)


def sampler_spec(*, temperature, top_k=None, top_p=None, min_p=None, order="hf") -> SamplerSpec:
    """The validated :class:`SamplerSpec`; raises before any kernel runs, naming the bad value.

    ``temperature > 0`` (finite), ``top_k`` an int ``≥ 1`` (a ``top_k`` above the vocabulary keeps
    everything), ``top_p`` in ``(0, 1]``, ``min_p`` in ``[0, 1)``; ``None`` turns a rule off.
    vLLM's "off" values ``top_k = -1`` / ``0`` are refused: pass ``None``.
    """
    temperature, top_k, top_p, min_p = (as_number(n, v) for n, v in (
        ("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p)))
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r} (None turns top-k off)")
    for name, value, ok, interval in (("top_p", top_p, lambda v: 0.0 < v <= 1.0, "(0, 1]"),
                                      ("min_p", min_p, lambda v: 0.0 <= v < 1.0, "[0, 1)")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not ok(float(value))):
            raise ValueError(f"{name} must be None or a number in {interval}, got {value!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return SamplerSpec(top_k=top_k, top_p=None if top_p is None else float(top_p),
                       min_p=None if min_p is None else float(min_p), order=order)


def _masked(d, keep):
    return torch.where(keep, d, torch.full_like(d, -math.inf))


def _keep_top_k(d, keep, k):
    if k >= d.shape[-1]:
        return keep
    kth = torch.topk(_masked(d, keep), k, dim=-1).values[:, -1:]
    return keep & (d >= kth)


def _keep_top_p(d, keep, p):
    """Nucleus of the distribution renormalized over ``keep``: the descending prefix whose
    exclusive mass is ``< p``, extended to every value tied with its last element."""
    ranked = torch.sort(_masked(d, keep), dim=-1, descending=True).values
    q = torch.softmax(ranked, dim=-1)
    before = torch.cumsum(q, dim=-1).roll(1, dims=-1)  # mass strictly before each rank
    before[:, 0] = 0.0
    n_kept = (before < p).sum(-1, keepdim=True).clamp(min=1)
    return keep & (d >= ranked.gather(-1, n_kept - 1))


def _keep_min_p(d, keep, min_p):
    return keep & (torch.exp(d) >= min_p)  # d = z − max z: exp(d) = p_v / p_max


def kept_threshold(d, spec: SamplerSpec):
    """``τ [C]``: the kept set of each row of ``d = z − max z`` ``[C, V]`` is ``d ≥ τ``
    (``−inf`` when nothing is truncated)."""
    if not spec.truncates:
        return torch.full(d.shape[:-1], -math.inf, dtype=d.dtype, device=d.device)
    keep = torch.ones_like(d, dtype=torch.bool)
    min_p = spec.min_p or 0.0
    if spec.order == "vllm" and min_p > 0:
        keep = _keep_min_p(d, keep, min_p)
    if spec.top_k is not None:
        keep = _keep_top_k(d, keep, spec.top_k)
    if spec.top_p is not None and spec.top_p < 1.0:
        keep = _keep_top_p(d, keep, spec.top_p)
    if spec.order == "hf" and min_p > 0:
        keep = _keep_min_p(d, keep, min_p)
    return torch.where(keep, d, torch.full_like(d, math.inf)).amin(-1)


def fold_forward(x, targets, spec: SamplerSpec, *, with_entropy, **transform):
    """Rows ``x [C, V]`` of raw logits (compute dtype) with their labels ``targets [C]``:
    ``(logp [C], stats [C, 2], entropy [C] or None)``.

    ``stats = (log s̃, τ)`` per row, both relative to the row's max ``z`` (what the backward needs);
    ``logp`` is ``−inf`` where the label is outside the kept set.  ``transform``: ``logit_scale``,
    ``temperature``, ``softcap`` of :func:`pyfused_po.token.torch_backend.token.row_stats`.
    """
    d, _, _, _ = row_stats(x, **transform)
    tau = kept_threshold(d, spec)
    kept = d >= tau.unsqueeze(-1)
    log_s = torch.logsumexp(_masked(d, kept), dim=-1)
    d_y = d.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    logp = torch.where(d_y >= tau, d_y - log_s, torch.full_like(d_y, -math.inf))
    entropy = None
    if with_entropy:
        logq = d - log_s.unsqueeze(-1)
        entropy = -torch.where(kept & (logq > -math.inf), logq.exp() * logq, torch.zeros_like(logq)).sum(-1)
    return logp, torch.stack([log_s, tau], dim=-1), entropy


def fold_backward(x, targets, stats, *, grad_logp=None, grad_entropy=None, entropy=None, **transform):
    """``∂L/∂x [C, V]`` (compute dtype) of rows ``x`` from the upstream gradients ``[C]`` of
    ``logp`` and of the entropy, the kept set rebuilt from ``stats`` (see the module docstring)."""
    d, _, _, _ = row_stats(x, **transform)
    log_s, tau = stats[:, :1], stats[:, 1:]
    kept = d >= tau
    logq = d - log_s
    q = torch.where(kept, logq.exp(), torch.zeros_like(logq))
    dz = torch.zeros_like(d)
    if grad_logp is not None:
        index = targets.long().unsqueeze(-1)
        # A label outside K has log p̃ = −inf, constant while K is fixed: no gradient from it.
        g = torch.where(d.gather(-1, index) >= tau, grad_logp.unsqueeze(-1).to(d.dtype), torch.zeros_like(tau))
        dz = dz - g * q
        dz.scatter_add_(-1, index, g)
    if grad_entropy is not None:
        h = entropy.unsqueeze(-1).to(d.dtype)
        dz = dz - grad_entropy.unsqueeze(-1).to(d.dtype) * torch.where(q > 0, q * (logq + h), torch.zeros_like(q))
    scale = _transform_grad(x, transform["logit_scale"], transform["temperature"], transform["softcap"])
    return dz * scale
