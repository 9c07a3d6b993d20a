"""``apply(GRPOTrainer)`` / ``apply(RLOOTrainer)``: the trainers' own losses on the three-GEMM plan.

Both losses separate over sequences (:mod:`.trl_rl_objective`), so the policy's LM head runs as
:func:`.trl_fused_step.policy_step` with chunks of whole completions: logits, the loss's gradient,
dH and dW in the forward — three GEMMs where TRL's loss on per-token log-probs costs four.

The step is TRL 1.16's own ``_compute_loss``, unchanged, called with a stand-in for the model
(:class:`_PlanScorer`): where TRL asks the model for the completion's log-probs and entropies, the
stand-in runs the policy's forward with the plan and hands TRL the plan's per-token values,
detached.  TRL's code then computes the loss's value and logs every metric (clip ratios, entropy,
kl, ...) from those values, as it would from its own; the gradient is the plan's, joined to TRL's
value as a zero that carries it.  So values and metrics are TRL's by construction and only the
gradient is pyfused_po's (:func:`.trl_rl_objective.grpo_objective` /
:func:`~.trl_rl_objective.rloo_objective`, checked against TRL's autograd in the tests).  When the
plan cannot run for a call (a completion longer than a chunk: the reason kept in
``trainer.fallback_reason`` and logged once; grad mode off, ...), the stand-in hands TRL the staged
path's values with their graph: TRL's loss on pyfused_po's forward.

Refused at ``apply`` (TRL's loss on the fused forward for the run, the reason logged once): a
``top_entropy_quantile`` below 1 (a quantile of the whole batch's entropies masks each token), a
``loss_type`` or ``importance_sampling_level`` TRL 1.16 does not have, a TRL release other than
1.16 (whose losses the objectives were checked against), ``apply(..., truncated_support=True)`` (the
policy scored under its sampler's truncation, staged), the MoE aux loss and prompt-learning PEFT.
"""
import types
from importlib import metadata

from .trl import _release
from .trl_fused_step import policy_step, switch_to_plan
from .trl_head import head_owner
from .trl_patch_state import installed_patch
from .trl_rl_objective import GRPO_LOSS_TYPES, IMPORTANCE_LEVELS, grpo_objective, reads_entropy, rloo_objective

__all__ = ["switch_grpo_loss", "switch_rloo_loss"]

_EXTRAS = ("entropy",)
_CHECKED_TRL = (1, 16)  # the release whose GRPO / RLOO losses trl_rl_objective reproduces (tests)


def _common_refusals(trainer):
    """Refusals shared by both trainers: a TRL release other than the one the objectives were checked
    against, a policy patched with its sampler's truncation (the plan's fold is the full softmax)."""
    refusals = []
    version = metadata.version("trl")
    if _release(version) != _CHECKED_TRL:
        refusals.append(f"{type(trainer).__name__}'s loss in trl=={version} is not the one pyfused_po reproduces "
                        f"(TRL {'.'.join(map(str, _CHECKED_TRL))})")
    state = installed_patch(head_owner(trainer.model))
    if state is not None and state.truncation is not None:
        refusals.append("truncated_support=True: the policy's log-probs come from the sampler's truncated "
                        "distribution, scored staged")
    return refusals


def switch_grpo_loss(trainer, *, backend="auto", linear_impl="auto"):
    """Run a ``GRPOTrainer``'s loss on the plan (its models already patched); ``ValueError`` naming
    every reason it cannot."""
    refusals = _common_refusals(trainer)
    if trainer.top_entropy_quantile < 1.0:
        refusals.append(f"top_entropy_quantile={trainer.top_entropy_quantile} masks tokens by a quantile of the "
                        "whole batch's entropies")
    if trainer.importance_sampling_level not in IMPORTANCE_LEVELS:
        refusals.append(f"importance_sampling_level {trainer.importance_sampling_level!r} is not one of "
                        f"{IMPORTANCE_LEVELS}")
    switch_to_plan(trainer, trainer.loss_type, GRPO_LOSS_TYPES, "_compute_loss", _compute_loss_on_the_plan,
                   refusals=refusals, backend=backend, linear_impl=linear_impl, objective=grpo_objective)


def switch_rloo_loss(trainer, *, backend="auto", linear_impl="auto"):
    """Run an ``RLOOTrainer``'s loss on the plan; ``ValueError`` naming every reason it cannot."""
    switch_to_plan(trainer, "rloo", ("rloo",), "_compute_loss", _compute_loss_on_the_plan,
                   refusals=_common_refusals(trainer), backend=backend, linear_impl=linear_impl,
                   objective=rloo_objective)


def _compute_loss_on_the_plan(self, model, inputs):
    """The trainer's ``_compute_loss`` (TRL 1.16) on a stand-in model that runs the plan."""
    scorer = _PlanScorer(self, model, inputs)
    loss = type(self)._compute_loss(self, scorer, inputs)
    return loss + scorer.anchor


class _PlanScorer:
    """Called by TRL's ``_get_per_token_logps_and_entropies`` as ``model(..., labels=, fused_lm_head=True)``:
    runs ``model``'s fused forward with the plan's loss and returns the per-token ``log_probs`` and
    ``entropy`` (aligned with ``labels[:, 1:]``, as TRL's fused head returns them).  :attr:`anchor`:
    a zero carrying the plan's gradient (a constant zero when the staged path ran)."""

    def __init__(self, trainer, model, inputs):
        self.trainer, self.model, self.inputs = trainer, model, inputs
        self.rows, self.completion = inputs["completion_ids"].shape
        self.anchor = None

    def __call__(self, *, labels, fused_lm_head, **model_inputs):
        from .hf import lm_head_transform
        from .trl_head import head_owner, trl_head_settings

        if self.anchor is not None or labels.shape[0] != self.rows:
            raise RuntimeError("pyfused_po's GRPO/RLOO plan scores the whole batch in one model call (its loss's "
                               f"constants are per row); this trainer asked for {labels.shape[0]} of {self.rows} "
                               "rows, or called the model twice")
        settings = self.trainer.pyfused_po_settings
        objective = settings["objective"](self.trainer, self.inputs)
        token_kwargs = dict(ignore_index=-100, shift=False, temperature=trl_head_settings(self.model)["temperature"],
                            backend=settings["backend"], **lm_head_transform(head_owner(self.model)))
        captured, k, bonus = {}, self.completion, reads_entropy(self.trainer)

        def loss_of(values):  # the completion is the last K label columns
            if bonus:  # the plan differentiates the entropy too
                return objective(values.logps[:, -k:], values.entropy[:, -k:])
            return objective(values[:, -k:])

        def head_loss(hidden, weight, bias, labels):
            # A row is a sequence: the group of the plan.
            anchor, tokens = policy_step((hidden, weight, bias), labels, loss_of, token_kwargs, extras=_EXTRAS,
                                         linear_impl=settings["linear_impl"], anchor=True,
                                         grad_extras=_EXTRAS if bonus else (), owner=self.trainer)
            captured["tokens"] = tokens
            return anchor

        self.anchor = self.model(**model_inputs, labels=labels, fused_lm_head=fused_lm_head, pyfused_po_loss=head_loss)
        tokens = captured["tokens"]
        return types.SimpleNamespace(log_probs=tokens.logps, entropy=tokens.entropy, aux_loss=None)
