"""Listwise objectives: losses of a group of K responses to one prompt, ranked by a score.

Notation.  A group holds K responses; ``scores`` ψ rank them (higher is preferred) and
each row of a :class:`GroupBatch` lists its members by descending score (position 0 is
the best).  u = β·(ℓ − ℓʳ) is a response's implicit reward (ℓ, ℓʳ: summed policy and
reference log-probs).  Every loss is a pure function of one group's per-sequence sums, so
the loss of a batch is a sum over groups (see :mod:`pyfused_po.objectives.listwise_loss`).

* ``plackett_luce`` (DPO paper, App. A.3), ``top_m`` = m (default all):
  L = −Σ_{k<m} [u_(k) − log Σ_{j≥k} exp u_(j)].
* ``softmax_dpo`` (S-DPO, the best response against all others):
  L = −log σ(−log Σ_{j≠best} exp(u_j − u_best)).
* ``lipo_lambda`` (LiPO-λ): L = −Σ_{ψ_i>ψ_j} Δ_ij · log σ(u_i − u_j),
  Δ_ij = |G_i − G_j|·|1/D_i − 1/D_j|, G = 2^ψ − 1, D = log(1 + rank) (natural log), the
  rank (1 = first) taken by descending u with no gradient through it.
* ``adpo`` (ADPO, listwise), ``adpo_tau`` = τ: L = KL(q ‖ softmax(u)), q = softmax(ψ/τ).

Each is also registered as a pair loss (a pair is a group of two with scores (1, 0)), so
``preference_loss`` / ``FusedPreferenceLoss`` run it on ``[chosen; rejected]`` batches
through every path pairs have.  For K = 2, ``plackett_luce`` and ``softmax_dpo`` both equal
DPO's ``sigmoid`` loss.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from .registry import ObjectiveOutput, PairBatch, register_objective


@dataclass
class GroupBatch:
    """``[G, K]`` per-member inputs, each row ordered by descending score; ``valid`` marks the
    real members of a group shorter than K (the others are padding at the end of the row).

    ``scores`` are 0 at padding; ``logps`` / ``ref_logps`` / ``lengths`` hold 0 there too."""

    logps: torch.Tensor
    ref_logps: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor
    lengths: Optional[torch.Tensor] = None

    def rewards(self, beta):
        """u = β·(ℓ − ℓʳ), 0 at padding."""
        u = beta * (self.logps - self.ref_logps)
        return torch.where(self.valid, u, torch.zeros_like(u))


@dataclass
class GroupObjectiveOutput:
    """``losses`` ``[G]``; ``rewards`` ``[G, K]`` in the rows' order (detached by the caller)."""

    losses: torch.Tensor
    rewards: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class ListwiseObjective:
    name: str
    fn: Callable[..., GroupObjectiveOutput]
    tie_problem: Optional[Callable[..., Optional[str]]] = None


_LISTWISE: Dict[str, ListwiseObjective] = {}


def listwise_objective(name) -> Optional[ListwiseObjective]:
    """The listwise objective registered under ``name``, or None for a pairwise loss."""
    return _LISTWISE.get(name)


def listwise_types():
    """Names of the listwise losses (each is in :func:`pyfused_po.loss_types` too)."""
    return sorted(_LISTWISE)


def pair_group_batch(batch: PairBatch) -> GroupBatch:
    """A batch of pairs as groups of two: rows (chosen, rejected), scores (1, 0)."""
    logps = torch.stack([batch.chosen_logps, batch.rejected_logps], dim=1)
    ref = torch.stack([batch.ref_chosen_logps, batch.ref_rejected_logps], dim=1)
    scores = torch.tensor([1.0, 0.0], dtype=logps.dtype, device=logps.device).expand_as(logps)
    lengths = None
    if batch.chosen_lengths is not None and batch.rejected_lengths is not None:
        lengths = torch.stack([batch.chosen_lengths, batch.rejected_lengths], dim=1)
    return GroupBatch(logps, ref, scores, torch.ones_like(logps, dtype=torch.bool), lengths)


def register_listwise(name, *, hyperparameters=None, check=None, tie_problem=None):
    """Register a listwise loss ``fn(group: GroupBatch, *, beta, **hyperparameters)``.

    It goes into the objective registry as a pair loss too (its groups of two), under the
    same name and hyper-parameters.  ``tie_problem(scores, valid, **hyperparameters)`` names
    the first group whose tied scores leave the loss undefined (None when all are defined)."""

    def decorate(fn):
        def on_pairs(batch: PairBatch, *, beta, **values):
            out = fn(pair_group_batch(batch), beta=beta, **values)
            return ObjectiveOutput(out.losses, out.rewards[:, 0], out.rewards[:, 1], out.metrics)

        on_pairs.__doc__ = f"{name} on a batch of pairs (groups of two, scores (1, 0)).\n\n{fn.__doc__}"
        on_pairs.__name__ = f"{fn.__name__}_on_pairs"
        register_objective(name, hyperparameters=hyperparameters, check=check)(on_pairs)
        _LISTWISE[name] = ListwiseObjective(name, fn, tie_problem)
        return fn

    return decorate


def _first_tie(tied, what):
    """A message naming the first group where ``tied`` ``[G]`` holds, else None."""
    if tied.numel() and bool(tied.any()):
        g = int(tied.nonzero()[0, 0])
        return f"group {g} {what}"
    return None


# ----------------------------------------------------------------------------- plackett_luce

def _check_top_m(*, beta, top_m):
    if top_m is not None and (isinstance(top_m, bool) or not isinstance(top_m, int) or top_m < 1):
        raise ValueError(f"top_m must be None (every position) or an integer >= 1, got {top_m!r}")


def _plackett_luce_ties(scores, valid, *, top_m):
    """Plackett–Luce orders the first m positions: ψ_(k) = ψ_(k+1) for a k < m with a
    member at k + 1 makes that order ambiguous.  Ties among positions ≥ m are defined."""
    K = scores.shape[1]
    m = K if top_m is None else min(top_m, K)
    k = min(m, K - 1)
    tied = ((scores[:, :k] == scores[:, 1:k + 1]) & valid[:, 1:k + 1]).any(dim=1)
    return _first_tie(tied, f"ties two of its first top_m={top_m} ranks; Plackett-Luce needs them "
                            f"strictly ordered (break the tie or lower top_m)")


@register_listwise("plackett_luce", hyperparameters={"top_m": None}, check=_check_top_m,
                   tie_problem=_plackett_luce_ties)
def plackett_luce(group: GroupBatch, *, beta, top_m):
    """−Σ_{k<m} [u_(k) − log Σ_{j≥k} exp u_(j)] over each group's members (m = top_m or all)."""
    u = group.rewards(beta)
    G, K = u.shape
    position = torch.arange(K, device=u.device)
    later = position[None, :] >= position[:, None]  # [k, j]: j ≥ k
    in_suffix = later[None] & group.valid[:, None, :]  # [G, k, j]
    # A padding position's row keeps its own (0) entry, so its log-sum-exp stays finite; its term is dropped.
    in_suffix = in_suffix | (~group.valid[:, :, None] & torch.eye(K, dtype=torch.bool, device=u.device))
    minus_inf = torch.full((), float("-inf"), dtype=u.dtype, device=u.device)
    suffix_lse = torch.logsumexp(torch.where(in_suffix, u[:, None, :], minus_inf), dim=-1)  # [G, K]
    m = K if top_m is None else top_m
    counted = group.valid & (position < m)[None, :]
    terms = torch.where(counted, u - suffix_lse, torch.zeros_like(u))
    return GroupObjectiveOutput(-terms.sum(dim=1), u)


# ----------------------------------------------------------------------------- softmax_dpo

def _softmax_dpo_ties(scores, valid, **_):
    tied = (scores[:, 0] == scores[:, 1]) & valid[:, 1]
    return _first_tie(tied, "has two best responses (tied top scores); softmax_dpo needs one best")


@register_listwise("softmax_dpo", tie_problem=_softmax_dpo_ties)
def softmax_dpo(group: GroupBatch, *, beta):
    """S-DPO: −log σ(−log Σ_{j≠best} exp(u_j − u_best)) = log(1 + Σ_{j≠best} exp(u_j − u_best))."""
    u = group.rewards(beta)
    others = group.valid & (torch.arange(u.shape[1], device=u.device) > 0)  # every member but the best
    minus_inf = torch.full((), float("-inf"), dtype=u.dtype, device=u.device)
    x = torch.logsumexp(torch.where(others, u - u[:, :1], minus_inf), dim=1)
    return GroupObjectiveOutput(-F.logsigmoid(-x), u)


# ----------------------------------------------------------------------------- lipo_lambda

def policy_ranks(u, valid):
    """1-based rank of each member by descending u among its group's members (ties: row order)."""
    minus_inf = torch.full((), float("-inf"), dtype=u.dtype, device=u.device)
    order = torch.sort(torch.where(valid, u.detach(), minus_inf), dim=1, descending=True, stable=True)[1]
    ranks = torch.empty_like(order)
    positions = torch.arange(1, u.shape[1] + 1, device=u.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


@register_listwise("lipo_lambda")
def lipo_lambda(group: GroupBatch, *, beta):
    """LiPO-λ: −Σ_{ψ_i>ψ_j} Δ_ij · log σ(u_i − u_j), Δ_ij = |G_i − G_j|·|1/D_i − 1/D_j|,
    G = 2^ψ − 1, D = log(1 + rank by u), Δ without gradient.  Tied scores form no pair."""
    u = group.rewards(beta)
    psi = group.scores
    gain = torch.exp2(psi) - 1.0
    inv_discount = 1.0 / torch.log1p(policy_ranks(u, group.valid).to(u.dtype))
    delta = ((gain[:, :, None] - gain[:, None, :]).abs()
             * (inv_discount[:, :, None] - inv_discount[:, None, :]).abs())
    pairs = group.valid[:, :, None] & group.valid[:, None, :] & (psi[:, :, None] > psi[:, None, :])
    log_win = F.logsigmoid(u[:, :, None] - u[:, None, :])
    terms = torch.where(pairs, delta.detach() * log_win, torch.zeros_like(log_win))
    return GroupObjectiveOutput(-terms.sum(dim=(1, 2)), u)


# ----------------------------------------------------------------------------- adpo

def _check_adpo(*, beta, adpo_tau):
    if isinstance(adpo_tau, bool) or not isinstance(adpo_tau, (int, float)) or not (0 < adpo_tau < float("inf")):
        raise ValueError(f"adpo_tau must be a finite number > 0 (the temperature of the target), got {adpo_tau!r}")


@register_listwise("adpo", hyperparameters={"adpo_tau": 1.0}, check=_check_adpo)
def adpo(group: GroupBatch, *, beta, adpo_tau):
    """ADPO (Wang, 2025), listwise: KL(q ‖ softmax(u)) over the group's members, with the
    anchored logits u = β·(ℓ − ℓʳ) (β = 1/τ_anc) and the target q = softmax(ψ/τ) of the scores
    (τ = ``adpo_tau``).  As τ → 0, q is one-hot on the best and the loss is ``softmax_dpo``;
    ties get equal target mass."""
    u = group.rewards(beta)
    minus_inf = torch.full((), float("-inf"), dtype=u.dtype, device=u.device)
    target = torch.softmax(torch.where(group.valid, group.scores / adpo_tau, minus_inf), dim=1).detach()
    log_model = torch.log_softmax(torch.where(group.valid, u, minus_inf), dim=1)
    # q·(log q − log p), 0 at padding and where q underflows to 0 (no 0·(−∞)).
    cross = torch.where(group.valid, target * log_model, torch.zeros_like(u))
    return GroupObjectiveOutput(torch.special.xlogy(target, target).sum(dim=1) - cross.sum(dim=1), u)
