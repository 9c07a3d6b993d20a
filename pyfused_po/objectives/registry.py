"""Objective stage: a registry of sequence-level preference losses.

An objective is a pure function of per-sequence tensors::

    @register_objective("name", hyperparameters={"gamma": 0.5}, needs_reference=False)
    def my_loss(batch: PairBatch, *, beta, gamma) -> ObjectiveOutput: ...

It receives **summed** log-probs plus lengths (an objective that wants averages
divides itself), computes in fp32 or wider, and returns per-pair losses and the
rewards TRL logs.  Adding a loss is one function here and one test row; it never
touches a kernel.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from .transforms import f_divergence_scores


@dataclass
class PairBatch:
    """Per-pair inputs of an objective, each ``[P]`` (P = number of pairs).

    ``nll_logps`` / ``nll_lengths`` are the summed log-probs and token counts of the
    chosen responses over the NLL mask (losses with an SFT term: ``sft``, ``cpo``,
    ``simpo``, ``alphapo``, ``orpo``); they default to ``chosen_logps`` /
    ``chosen_lengths``.  ``f_divergence_type`` selects TRL's score transform of the
    log-ratios (see :func:`~pyfused_po.objectives.transforms.f_divergence_scores`).
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: Optional[torch.Tensor] = None
    ref_rejected_logps: Optional[torch.Tensor] = None
    chosen_lengths: Optional[torch.Tensor] = None
    rejected_lengths: Optional[torch.Tensor] = None
    nll_logps: Optional[torch.Tensor] = None
    nll_lengths: Optional[torch.Tensor] = None
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 1.0
    # Per-sequence full-vocabulary KL(π_ref ‖ π_θ) summed over each response (EXPO).
    chosen_kl: Optional[torch.Tensor] = None
    rejected_kl: Optional[torch.Tensor] = None

    def lengths(self, who: str):
        """Lengths of ``"chosen"`` or ``"rejected"``; raises if the caller did not pass them."""
        value = getattr(self, f"{who}_lengths")
        if value is None:
            raise ValueError(f"this loss averages over tokens and needs {who}_lengths")
        return value

    def average(self, who: str):
        """ℓ/n: the length-averaged policy log-prob (n clamped to ≥ 1 so empty responses give 0)."""
        return getattr(self, f"{who}_logps") / self.lengths(who).clamp(min=1.0)

    def logratios(self):
        """(ℓ_w − ℓʳ_w, ℓ_l − ℓʳ_l)."""
        return (self.chosen_logps - self.ref_chosen_logps,
                self.rejected_logps - self.ref_rejected_logps)

    def scores(self):
        """The log-ratios after the ``f_divergence_type`` transform (identity for reverse KL)."""
        chosen, rejected = self.logratios()
        return (f_divergence_scores(chosen, self.f_divergence_type, self.f_alpha_divergence_coef),
                f_divergence_scores(rejected, self.f_divergence_type, self.f_alpha_divergence_coef))

    def nll(self):
        """Token-mean NLL of the chosen responses over the whole batch (a scalar), as
        ``cross_entropy`` over all chosen tokens computes it; 0 when there are none."""
        logps = self.chosen_logps if self.nll_logps is None else self.nll_logps
        lengths = self.nll_lengths if self.nll_logps is not None else self.chosen_lengths
        if lengths is None:
            raise ValueError("this loss has an NLL term and needs chosen_lengths (or nll_lengths)")
        return -logps.sum() / lengths.sum().clamp(min=1.0)


@dataclass
class ObjectiveOutput:
    """``losses`` per pair; ``chosen_rewards`` / ``rejected_rewards`` per pair (detached by
    the caller); ``metrics`` holds any extra loss-specific scalars to log."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Objective:
    name: str
    fn: Callable[..., ObjectiveOutput]
    needs_reference: bool
    hyperparameters: Dict[str, object]
    check: Optional[Callable[..., None]] = None
    uses_f_divergence: bool = False


_REGISTRY: Dict[str, Objective] = {}


def register_objective(name, *, needs_reference=True, hyperparameters=None, check=None,
                       uses_f_divergence=False):
    """Decorator adding ``fn`` to the registry under ``name``.

    ``hyperparameters`` maps each keyword the loss takes (besides ``beta``) to its
    default; ``check(beta=..., **hyperparameters)`` raises ``ValueError`` for values
    outside the loss's domain.  ``uses_f_divergence``: the loss reads
    :meth:`PairBatch.scores`, so ``f_divergence_type`` applies to it.
    """

    def decorate(fn):
        if name in _REGISTRY:
            raise ValueError(f"loss_type {name!r} is registered twice")
        _REGISTRY[name] = Objective(name, fn, needs_reference, dict(hyperparameters or {}), check,
                                    uses_f_divergence)
        return fn

    return decorate


def get_objective(name) -> Objective:
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss_type {name!r}; valid loss types are {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def loss_types():
    """Names of every registered loss."""
    return sorted(_REGISTRY)
