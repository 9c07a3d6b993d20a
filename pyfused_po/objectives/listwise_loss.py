"""``listwise_preference_loss``: the objective stage on groups of K responses per prompt.

The batch is S sequences in G groups (:mod:`pyfused_po.sequence.groups`), each sequence with its
summed policy / reference log-probs and a score.  Per group g, with u = β·(ℓ − ℓʳ):

* a **listwise** loss (``plackett_luce``, ``softmax_dpo``, ``lipo_lambda``;
  :mod:`pyfused_po.objectives.listwise`) is a function of the group's members;
* a **pairwise** loss (``sigmoid``, ``ipo``, ``hinge``, ``simpo``, … every registered pair
  loss but the batch-coupled ones) is the mean over the group's ordered pairs (i better
  than j) of that loss, computed by :func:`pyfused_po.preference_loss` itself on the pairs'
  ``[better; worse]`` columns with its hyper-parameters (Curry-DPO's all pairs);
* ``nll_index=[G]`` names, per group, the member whose NLL is added (Triple PO's gold
  response; RPO): ``nll_alpha`` × the token-mean NLL over the named members of the batch,
  −Σ_g ℓ_{n(g)} / Σ_g n_{n(g)}, added to every group's loss.

``out.losses`` is ``[G]``, ``out.loss`` their mean.  The loss is a sum over groups of
functions of each group's own sums (the NLL's denominator is a token count, a constant), so
its gradient with respect to a sequence's sum reads only that sequence's group: the fused
three-GEMM plan may cut the batch into chunks of whole groups as it does pairs.

Everything that does not depend on the sums (the groups, the loss types and hyper-parameters,
ties, ``nll_index``) is checked once by :func:`listwise_plan`, before any kernel; the returned
:class:`ListwisePlan`'s :meth:`~ListwisePlan.loss` is then a pure function of the sums, cheap to
call once per chunk of groups.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..sequence.groups import GroupLayout, group_layout
from .listwise import GroupBatch, listwise_objective
from .transforms import batch_mean
from .preference_loss import checked_like, preference_loss, resolve_hyperparameters, resolve_loss_weights
from ..validation import as_number, check_same_device, check_tensor

# Pair losses whose value for one pair depends on the whole batch: no per-group meaning.
NOT_ON_GROUPS = {
    "aot": "sorts margins across the batch (its k-th loss belongs to a rank, not to a pair)",
    "aot_unpaired": "sorts margins across the batch (its k-th loss belongs to a rank, not to a pair)",
    "expo": "needs per-response KL sums that groups do not carry yet",
}


@dataclass
class ListwiseLossOutput:
    """``loss``: mean over groups; ``losses``: ``[G]``; ``metrics``: detached scalars;
    ``rewards``: ``[S]`` per sequence (the first loss type's, detached); ``layout``: the groups."""

    loss: torch.Tensor
    losses: torch.Tensor
    metrics: Dict[str, torch.Tensor]
    rewards: torch.Tensor
    layout: GroupLayout


def _per_sequence(name, x, like):
    return checked_like(name, x, like, "one value per sequence, like policy_logps")


def _check_group_hyperparameters(name, values):
    for key, value in values.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            raise ValueError(f"{key} for loss_type={name!r} on groups must be a number or a 0-d tensor: a "
                             f"per-pair tensor has no pair to attach to (pairs are formed inside each group), "
                             f"got shape {tuple(value.shape)}")


def _checked_nll_index(nll_index, layout):
    """``[G]`` int64 sequence ids, each a member of its own group."""
    if not isinstance(nll_index, torch.Tensor) or nll_index.dtype not in (torch.int32, torch.int64):
        got = nll_index.dtype if isinstance(nll_index, torch.Tensor) else type(nll_index).__name__
        raise TypeError(f"nll_index must be an int32/int64 tensor (one sequence id per group), got {got}")
    G, S = layout.num_groups, layout.group_of.numel()
    if tuple(nll_index.shape) != (G,):
        raise ValueError(f"nll_index must have shape ({G},) (one sequence id per group), got "
                         f"{tuple(nll_index.shape)}")
    index = nll_index.to(device=layout.group_of.device, dtype=torch.int64)
    bad = (index < 0) | (index >= S)
    if bool(bad.any()):
        raise ValueError(f"nll_index must hold sequence ids in [0, {S}), got {int(index[bad][0])}")
    foreign = layout.group_of[index] != torch.arange(G, device=index.device)
    if bool(foreign.any()):
        g = int(foreign.nonzero()[0, 0])
        raise ValueError(f"nll_index[{g}] = {int(index[g])} is a sequence of group "
                         f"{int(layout.group_of[index[g]])}, not of group {g}")
    return index


def _rank_metrics(layout, rewards):
    """``rewards/rank_k`` (mean reward at score rank k), and over the ordered pairs the fraction
    the rewards order correctly (``rewards/accuracies``) and the mean margin."""
    table = layout.table(rewards)
    metrics = {}
    for k in range(table.shape[1]):
        present = layout.valid[:, k]
        metrics[f"rewards/rank_{k}"] = table[:, k].sum() / present.sum().clamp(min=1)
    margin = rewards[layout.better] - rewards[layout.worse]
    metrics["rewards/accuracies"] = batch_mean((margin > 0).to(rewards.dtype))
    metrics["rewards/margins"] = batch_mean(margin)
    return metrics


@dataclass(frozen=True)
class ListwisePlan:
    """The checked configuration of a listwise loss on one batch's groups (:func:`listwise_plan`)."""

    layout: GroupLayout
    resolved: List[Tuple[object, Dict[str, object]]]  # [(objective, its hyper-parameters)]
    mix: List[float]
    beta: float
    f_divergence_type: str
    f_alpha_divergence_coef: float
    nll_index: Optional[torch.Tensor]
    nll_alpha: float

    @property
    def num_sequences(self):
        return self.layout.group_of.numel()

    @property
    def needs_reference(self):
        return any(objective.needs_reference for objective, _ in self.resolved)

    def _group_losses(self, objective, values, logps, ref, lens):
        """(``[G]`` losses, ``[S]`` rewards, metrics) of one loss type."""
        layout = self.layout
        listwise = listwise_objective(objective.name)
        if listwise is not None:
            group = GroupBatch(layout.table(logps), layout.table(ref), layout.scores.to(logps.dtype), layout.valid,
                               None if lens is None else layout.table(lens))
            out = listwise.fn(group, beta=self.beta, **values)
            return out.losses, layout.per_sequence(out.rewards), out.metrics
        b, w = layout.better, layout.worse
        pairs = preference_loss(
            logps[b], logps[w], None if ref is None else ref[b], None if ref is None else ref[w],
            loss_type=objective.name, beta=self.beta, reduction="none",
            chosen_lengths=None if lens is None else lens[b], rejected_lengths=None if lens is None else lens[w],
            f_divergence_type=self.f_divergence_type, f_alpha_divergence_coef=self.f_alpha_divergence_coef, **values)
        rewards = torch.zeros_like(logps).index_put((b,), pairs.chosen_rewards).index_put((w,), pairs.rejected_rewards)
        own = {k: v for k, v in pairs.metrics.items() if not k.startswith(("rewards/", "logps/"))}
        return self.layout.group_mean(pairs.losses), rewards, own

    def loss(self, policy_logps, ref_logps=None, lengths=None, nll_logps=None, nll_lengths=None) -> ListwiseLossOutput:
        """The loss of per-sequence sums, each ``[S]`` (see :func:`listwise_preference_loss`)."""
        check_tensor("policy_logps", policy_logps, floating=True)
        if tuple(policy_logps.shape) != (self.num_sequences,):
            raise ValueError(f"policy_logps must have shape ({self.num_sequences},) (one sum per sequence of the "
                             f"groups), got {tuple(policy_logps.shape)}")
        given = dict(ref_logps=_per_sequence("ref_logps", ref_logps, policy_logps),
                     lengths=_per_sequence("lengths", lengths, policy_logps),
                     nll_logps=_per_sequence("nll_logps", nll_logps, policy_logps),
                     nll_lengths=_per_sequence("nll_lengths", nll_lengths, policy_logps))
        check_same_device(policy_logps=policy_logps, groups=self.layout.members, **given)
        if self.needs_reference and ref_logps is None:
            needing = next(o.name for o, _ in self.resolved if o.needs_reference)
            raise ValueError(f"loss_type={needing!r} needs ref_logps")
        if self.nll_index is not None and lengths is None and nll_lengths is None:
            raise ValueError("nll_index needs lengths (or nll_lengths): the NLL is a token mean")
        wide = torch.float64 if policy_logps.dtype == torch.float64 else torch.float32
        logps = policy_logps.to(wide)
        ref = None if ref_logps is None else ref_logps.detach().to(wide)  # the reference is a constant
        lens = None if lengths is None else lengths.to(wide)
        losses, rewards, metrics = None, None, {}
        for (objective, values), weight in zip(self.resolved, self.mix):
            group_losses, own_rewards, own_metrics = self._group_losses(objective, values, logps, ref, lens)
            term = group_losses if weight == 1.0 else weight * group_losses
            losses = term if losses is None else losses + term
            rewards = own_rewards.detach() if rewards is None else rewards
            metrics.update(own_metrics)
        if self.nll_index is not None:
            sums = logps if nll_logps is None else nll_logps.to(wide)
            counts = lens if nll_lengths is None else nll_lengths.to(wide)
            # −Σ_g ℓ_{n(g)} / Σ_g n_{n(g)} over the named members (0 when they have no tokens).
            nll = -sums[self.nll_index].sum() / counts[self.nll_index].sum().clamp(min=1.0)
            losses = losses + self.nll_alpha * nll
            metrics["nll_loss"] = nll
        loss = losses.sum() / max(losses.numel(), 1)
        metrics = {**_rank_metrics(self.layout, rewards), **{k: v.detach() for k, v in metrics.items()}}
        return ListwiseLossOutput(loss, losses, metrics, rewards, self.layout)


def listwise_plan(num_sequences, scores=None, *, group_size=None, group_index=None, num_groups=None, layout=None,
                  loss_type="plackett_luce", beta=0.1, nll_index=None, nll_alpha=1.0, loss_weights=None,
                  f_divergence_type="reverse_kl", f_alpha_divergence_coef=1.0, **hyperparameters) -> ListwisePlan:
    """Every check of a listwise loss that does not read the sums, run once (before any kernel):
    the groups (:func:`pyfused_po.sequence.groups.group_layout`, or a prebuilt ``layout``), the loss types
    and their hyper-parameters, the ties each loss refuses, ``nll_index``.  Arguments as for
    :func:`listwise_preference_loss`."""
    if layout is not None:
        if not isinstance(layout, GroupLayout):
            raise TypeError(f"layout must be a pyfused_po.sequence.groups.GroupLayout, got {type(layout).__name__}")
        if any(x is not None for x in (scores, group_size, group_index, num_groups)):
            raise ValueError("pass layout= or scores= with group_size/group_index, not both")
        if layout.group_of.numel() != num_sequences:
            raise ValueError(f"layout describes {layout.group_of.numel()} sequences, the batch has {num_sequences}")
    elif scores is None:
        raise ValueError("scores=[S] is required: one score per sequence, higher is preferred")
    beta = as_number("beta", beta)
    f_alpha_divergence_coef = as_number("f_alpha_divergence_coef", f_alpha_divergence_coef)
    resolved = resolve_hyperparameters(loss_type, beta, hyperparameters, f_divergence_type=f_divergence_type,
                                       f_alpha_divergence_coef=f_alpha_divergence_coef)
    mix = resolve_loss_weights(loss_type, loss_weights)
    for objective, values in resolved:
        if objective.name in NOT_ON_GROUPS:
            raise ValueError(f"loss_type={objective.name!r} does not apply to groups: it "
                             f"{NOT_ON_GROUPS[objective.name]}")
        _check_group_hyperparameters(objective.name, values)
    nll_alpha = as_number("nll_alpha", nll_alpha)
    if isinstance(nll_alpha, bool) or not isinstance(nll_alpha, (int, float)) or nll_alpha != nll_alpha:
        raise ValueError(f"nll_alpha must be a number, got {nll_alpha!r}")
    if layout is None:
        layout = group_layout(scores, num_sequences=num_sequences, group_size=group_size, group_index=group_index,
                              num_groups=num_groups)
    for objective, values in resolved:
        listwise = listwise_objective(objective.name)
        checks_ties = listwise is not None and listwise.tie_problem is not None and layout.num_groups > 0
        problem = checks_ties and listwise.tie_problem(layout.scores, layout.valid, **values)
        if problem:
            raise ValueError(f"loss_type={objective.name!r}: {problem}")
    index = None if nll_index is None else _checked_nll_index(nll_index, layout)
    return ListwisePlan(layout, resolved, mix, beta, f_divergence_type, float(f_alpha_divergence_coef), index,
                        float(nll_alpha))


def listwise_preference_loss(policy_logps, ref_logps=None, scores=None, *, group_size=None, group_index=None,
                             num_groups=None, layout=None, loss_type="plackett_luce", beta=0.1, lengths=None,
                             nll_index=None, nll_alpha=1.0, nll_logps=None, nll_lengths=None, loss_weights=None,
                             f_divergence_type="reverse_kl", f_alpha_divergence_coef=1.0,
                             **hyperparameters) -> ListwiseLossOutput:
    """A preference loss of groups of responses from **summed** per-sequence log-probs.

    Args:
        policy_logps, ref_logps: ``[S]`` summed log-probs of every sequence (policy, reference).
        scores: ``[S]`` one score per sequence, higher is preferred (floating or integer).
        group_size: K: consecutive sequences form groups (``g·K … g·K + K − 1``); or
        group_index: ``[S]`` int tensor, the group of each sequence (any order, any sizes ≥ 2);
            ``num_groups`` fixes G (default: the largest id + 1).
        layout: instead of the three above and ``scores``, a :class:`~pyfused_po.sequence.groups.GroupLayout`
            built once per batch by :func:`~pyfused_po.sequence.groups.group_layout` (a plan that evaluates
            the loss once per chunk of groups reuses it: it depends on the scores and ids only).
        loss_type: a listwise loss (``plackett_luce``, ``softmax_dpo``, ``lipo_lambda``), any pair
            loss of :func:`pyfused_po.loss_types` (mean over each group's ordered pairs) except
            the batch-coupled ``aot``, ``aot_unpaired`` and ``expo``; or a list mixed by
            ``loss_weights``.
        beta: inverse temperature of the implicit reward (> 0).
        lengths: ``[S]`` token counts (losses that average; the NLL term).
        nll_index: ``[G]`` sequence ids, per group the member whose NLL is added with weight
            ``nll_alpha``; ``nll_logps`` / ``nll_lengths`` ``[S]`` sums over an NLL mask
            (default ``policy_logps`` / ``lengths``).
        f_divergence_type, f_alpha_divergence_coef, **hyperparameters: as for
            :func:`pyfused_po.preference_loss` (``top_m`` for ``plackett_luce``).

    Returns:
        :class:`ListwiseLossOutput`; metrics ``rewards/rank_k``, ``rewards/accuracies`` (the
        fraction of ordered pairs whose rewards agree with the scores), ``rewards/margins``,
        ``nll_loss`` with ``nll_index``, and the losses' own.
    """
    check_tensor("policy_logps", policy_logps, floating=True)
    if policy_logps.dim() != 1:
        raise ValueError(f"policy_logps must be 1-D [sequences], got shape {tuple(policy_logps.shape)}")
    if scores is not None:
        check_same_device(policy_logps=policy_logps, scores=scores)
    plan = listwise_plan(policy_logps.shape[0], scores, group_size=group_size, group_index=group_index,
                         num_groups=num_groups, layout=layout, loss_type=loss_type, beta=beta, nll_index=nll_index,
                         nll_alpha=nll_alpha, loss_weights=loss_weights, f_divergence_type=f_divergence_type,
                         f_alpha_divergence_coef=f_alpha_divergence_coef, **hyperparameters)
    return plan.loss(policy_logps, ref_logps, lengths, nll_logps, nll_lengths)
