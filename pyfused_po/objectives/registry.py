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


@dataclass
class PairBatch:
    """Per-pair inputs of an objective, each ``[P]`` (P = number of pairs)."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: Optional[torch.Tensor] = None
    ref_rejected_logps: Optional[torch.Tensor] = None
    chosen_lengths: Optional[torch.Tensor] = None
    rejected_lengths: Optional[torch.Tensor] = None

    def lengths(self, who: str):
        """Lengths of ``"chosen"`` or ``"rejected"``; raises if the caller did not pass them."""
        value = getattr(self, f"{who}_lengths")
        if value is None:
            raise ValueError(f"this loss averages over tokens and needs {who}_lengths")
        return value


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


_REGISTRY: Dict[str, Objective] = {}


def register_objective(name, *, needs_reference=True, hyperparameters=None, check=None):
    """Decorator adding ``fn`` to the registry under ``name``.

    ``hyperparameters`` maps each keyword the loss takes (besides ``beta``) to its
    default; ``check(beta=..., **hyperparameters)`` raises ``ValueError`` for values
    outside the loss's domain.
    """

    def decorate(fn):
        if name in _REGISTRY:
            raise ValueError(f"loss_type {name!r} is registered twice")
        _REGISTRY[name] = Objective(name, fn, needs_reference, dict(hyperparameters or {}), check)
        return fn

    return decorate


def get_objective(name) -> Objective:
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss_type {name!r}; valid loss types are {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def loss_types():
    """Names of every registered loss."""
    return sorted(_REGISTRY)
