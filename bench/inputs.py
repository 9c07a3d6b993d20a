"""Benchmark inputs: the same tensors for every method, rotated copies so L2 does not flatter.

* ``random``: logits (or ``hidden @ weightᵀ``) ~ N(0, 1): a flat softmax.
* ``realistic``: logits ~ N(0, 2²) plus a boost of 10–20 at the label, so the target
  usually dominates and the per-token entropy is a few nats, as in a trained LM.
  On the linear path the boost is ``a·W[y]`` added to the hidden state: with
  ``W ~ N(0, 1/D)``, ``W[y]·W[y] ≈ 1``, so the target logit rises by about ``a``.
"""
import math
from dataclasses import dataclass, field, replace
from typing import List, Optional

import torch

MAX_COPIES = 8


class _GradSink(torch.autograd.Function):
    """Identity on the logits whose backward keeps the incoming gradient in ``holder``
    instead of letting it reach the leaf's ``.grad``.

    In a model the logits are the LM head's output and their gradient flows on into the
    matmul backward; as a benchmark leaf, autograd's AccumulateGrad would *clone* a
    gradient that aliases other storage (an in-place backward), charging a copy no
    training step pays.  Keeping the gradient alive here still counts it in peak memory.
    """

    @staticmethod
    def forward(ctx, x, holder):
        ctx.holder = holder
        # A tensor on x's memory that autograd does not see as a view of the leaf (as an LM
        # head's output is not): the in-place backward refuses views of leaves requiring grad.
        return torch.empty(0, dtype=x.dtype, device=x.device).set_(x.untyped_storage(), x.storage_offset(),
                                                                    x.shape, x.stride())

    @staticmethod
    def backward(ctx, grad):
        ctx.holder.append(grad.detach())  # may alias the logits (in-place backward)
        return None, None


@dataclass
class Inputs:
    """One copy of a case's tensors.  Differentiable leaves: ``logits`` (logits path) or
    ``hidden`` and ``weight`` (linear path).  ``ref_*``: per-pair reference log-probs.
    The logits' gradient of the last step is ``logits_grad`` (see ``_GradSink``)."""

    labels: torch.Tensor                      # [2P, T] int64, all labelled
    logits: Optional[torch.Tensor] = None     # [2P, T, V]
    hidden: Optional[torch.Tensor] = None     # [2P, T, D]
    weight: Optional[torch.Tensor] = None     # [V, D]
    ref_chosen: Optional[torch.Tensor] = None
    ref_rejected: Optional[torch.Tensor] = None
    grads: List[torch.Tensor] = field(default_factory=list, repr=False)

    def leaves(self):
        return [t for t in (self.logits, self.hidden, self.weight) if t is not None]

    def zero_grads(self):
        for t in self.leaves():
            t.grad = None
        self.grads.clear()

    def for_step(self):
        """The tensors a method sees in one step: logits routed through ``_GradSink``."""
        if self.logits is None:
            return self
        return replace(self, logits=_GradSink.apply(self.logits, self.grads))

    @property
    def logits_grad(self):
        return self.grads[0] if self.grads else None


def _boost(generator, n, device):
    return torch.rand(n, generator=generator, device=device) * 10.0 + 10.0


def _logits(case, labels, generator, device):
    shape = (2 * case.pairs, case.seq_len, case.vocab)
    x = torch.randn(shape, generator=generator, device=device, dtype=case.torch_dtype)
    if case.kind == "realistic":
        x.mul_(2.0)
        idx = labels.unsqueeze(-1)
        boosted = x.gather(-1, idx).float() + _boost(generator, labels.numel(), device).view_as(idx)
        x.scatter_(-1, idx, boosted.to(x.dtype))
    return x


def _linear(case, labels, generator, device):
    dt = case.torch_dtype
    weight = torch.randn(case.vocab, case.hidden, generator=generator, device=device, dtype=dt)
    weight.mul_(case.hidden ** -0.5)
    hidden = torch.randn(2 * case.pairs, case.seq_len, case.hidden, generator=generator,
                         device=device, dtype=dt)
    if case.kind == "realistic":
        hidden.mul_(2.0)
        a = _boost(generator, labels.numel(), device).view(*labels.shape, 1)
        hidden.add_((weight[labels].float() * a).to(dt))
    return hidden, weight


def _check_tensors(case, tensors):
    """Prepared tensors (real activations) must have the case's shapes and dtype."""
    names = ("labels", "logits") if case.path == "logits" else ("labels", "hidden", "weight")
    rows, cols = 2 * case.pairs, case.seq_len
    want = {"labels": (rows, cols), "logits": (rows, cols, case.vocab),
            "hidden": (rows, cols, case.hidden), "weight": (case.vocab, case.hidden)}
    if set(tensors) != set(names):
        raise ValueError(f"tensors for a {case.path}-path case need keys {names}, got {sorted(tensors)}")
    for name in names:
        t = tensors[name]
        if tuple(t.shape) != want[name]:
            raise ValueError(f"tensors[{name!r}] must have shape {want[name]} for {case.key}, got {tuple(t.shape)}")
        dtype = torch.int64 if name == "labels" else case.torch_dtype
        if t.dtype != dtype:
            raise ValueError(f"tensors[{name!r}] must be {dtype}, got {t.dtype}")


def base_tensors(case, device, *, seed=0):
    """One draw of a synthetic case's tensors: ``labels`` and ``logits`` or ``hidden``, ``weight``."""
    if case.kind not in ("random", "realistic"):
        raise ValueError(f"kind {case.kind!r} has no generator here: pass its tensors (bench/real_inputs.py)")
    generator = torch.Generator(device=device).manual_seed(seed)
    labels = torch.randint(0, case.vocab, (2 * case.pairs, case.seq_len), generator=generator,
                           device=device)
    if case.path == "logits":
        return dict(labels=labels, logits=_logits(case, labels, generator, device))
    hidden, weight = _linear(case, labels, generator, device)
    return dict(labels=labels, hidden=hidden, weight=weight)


def make_inputs(case, device, *, seed=0, copies=1, tensors=None, copy_tensors=True):
    """``copies`` clones of one draw (same values, different memory), leaves requiring grad.

    ``tensors``: prepared base tensors (e.g. the real model's activations) instead of a draw;
    they are copied (an in-place backward must not clobber the caller's) unless
    ``copy_tensors=False`` hands them over (the memory probe: no transient second copy).
    """
    if tensors is None:
        base = base_tensors(case, device, seed=seed)
    else:
        _check_tensors(case, tensors)
        base = {k: v.detach().to(device) for k, v in tensors.items()}
        if copy_tensors:
            base = {k: v.clone() for k, v in base.items()}
    labels = base.pop("labels")
    out = []
    for i in range(copies):
        # A frozen LM head (case.frozen_head) is an input, not a leaf: no gradient is asked of it.
        leaves = {k: (v if i == 0 else v.clone()).requires_grad_(not (k == "weight" and case.frozen_head))
                  for k, v in base.items()}
        out.append(Inputs(labels=labels if i == 0 else labels.clone(), **leaves))
    return out


def rotation_copies(case, device) -> int:
    """Enough copies that one rotation spans at least twice the L2 cache, within 1..8 and
    within a quarter of the free memory."""
    if device.type != "cuda":
        return 1
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    need = math.ceil(2 * l2 / max(case.input_bytes(), 1))
    free, _ = torch.cuda.mem_get_info(device)
    fit = max(1, int(0.25 * free // max(case.input_bytes(), 1)))
    return max(1, min(MAX_COPIES, need, fit))
