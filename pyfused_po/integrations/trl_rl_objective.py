"""TRL 1.16's ``GRPOTrainer`` and ``RLOOTrainer`` losses as functions of the completion's log-probs.

The three-GEMM plan needs ``g_t = ∂L/∂log p_t`` while it holds a chunk's logits.  Both trainers'
losses separate over sequences: given the batch (advantages, masks, old / reference / sampler
log-probs, the accumulation and normalization counts: constants of the step), the gradient of a
token reads only its own sequence's log-probs.  Each builder here turns a trainer and its batch
into ``loss(logps)``, ``logps`` the ``[B, K]`` log-probs of the completion tokens, equal as a
function of ``logps`` (and of the entropies ``H``, for GRPO's entropy bonus) to the trainer's
``_compute_loss``.  Only its gradient is used: the loss's value and every metric come from the trainer's own code
(:mod:`.trl_rl_plan`).

GRPO (``loss_type`` ``l``, ``r`` the importance ratio, ``A`` the advantage, ``m`` the loss mask):

* ``s = log p − log p_old`` per token (``importance_sampling_level="token"``) or its masked mean
  over the sequence (``"sequence"``); ``r = exp(s)``; ``log p_old`` is ``log p`` detached when
  the batch has no old log-probs (one optimizer step per generation);
* per-token term ``ℓ``: ``−min(min(r, δ)·A, clip(r, 1−ε_low, 1+ε_high)·A)`` for ``grpo``, ``bnpo``,
  ``dr_grpo``, ``dapo``, ``luspo`` (``δ`` the optional two-sided clip); ``−sg(min(r, ε_high))·A·log p``
  for ``cispo``; ``−σ(τ(r − 1))·(4/τ)·A`` with ``τ`` the SAPO temperature of ``A``'s sign for
  ``sapo``; ``−φ·A·log p`` for ``vespo`` (``φ`` the trainer's detached gamma weight of the
  sequence's ratio);
* then ``ℓ`` times the off-policy sequence mask (DeepSeek-V3.2's, from the sequence's detached
  log-probs) when configured, times vLLM's importance-sampling ratio (a constant of the batch) when
  corrected for, plus ``β·KL`` with ``KL = exp(q − log p) − (q − log p) − 1`` (``q`` the reference;
  times ``r`` with ``use_bias_correction_kl``);
* reduced over the masked tokens: per-sequence means averaged (``grpo``, ``sapo``), the batch mean
  (``bnpo``), over ``B·max_completion_length`` (``dr_grpo``), over the generation batch's token count
  per process and accumulation window (``dapo``, ``cispo``, ``vespo``), per-sequence sums averaged
  (``luspo``); divided by the gradient-accumulation steps in training where TRL divides;
* minus the entropy bonus ``c·Σ H·m / Σ m`` (divided by the accumulation steps in training), ``c``
  the coefficient in force at the start of the step (the adaptive controller's gate read then).

RLOO: ``L = −mean_b min(r_b·A_b, clip(r_b, 1−ε_low, 1+ε_high)·A_b)`` with
``r_b = exp(Σ_t m·log p − log p_old,b)``.
"""
import torch

__all__ = ["GRPO_LOSS_TYPES", "grpo_objective", "rloo_objective", "reads_entropy"]

_PPO_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
GRPO_LOSS_TYPES = _PPO_CLIPPED + ("cispo", "sapo", "vespo")
IMPORTANCE_LEVELS = ("token", "sequence")


def _clipped_surrogate(ratio, advantages, eps_low, eps_high, delta=None):
    """PPO's pessimistic surrogate ``−min(r'·A, clip(r, 1−ε_low, 1+ε_high)·A)``, ``r' = min(r, δ)``."""
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    return -torch.min(ratio * advantages, clipped * advantages)


def _grpo_term(trainer, logps, log_ratio, ratio, advantages, mask, inputs):
    """The per-token policy term ``ℓ`` of ``trainer.loss_type`` (``[B, K]`` or ``[B, 1]``)."""
    kind, args = trainer.loss_type, trainer.args
    if kind in _PPO_CLIPPED:
        return _clipped_surrogate(ratio, advantages, trainer.epsilon_low, trainer.epsilon_high, args.delta)
    if kind == "cispo":  # REINFORCE on log p with a detached, capped ratio
        return -torch.clamp(ratio, max=trainer.epsilon_high).detach() * advantages * logps
    if kind == "sapo":  # a soft (sigmoid) gate in place of the clip
        tau = torch.where(advantages > 0, args.sapo_temperature_pos, args.sapo_temperature_neg)
        return -torch.sigmoid(tau * (ratio - 1)) * (4 / tau) * advantages
    # vespo: the trainer's own gamma weight (a no-grad function of each sequence's summed log-ratio)
    phi = trainer.get_gamma_weights(advantages=advantages, log_ratio_per_token=log_ratio, mask=mask,
                                    importance_sampling_ratio=inputs.get("importance_sampling_ratio"),
                                    k_pos=args.vespo_k_pos, lambda_pos=args.vespo_lambda_pos,
                                    k_neg=args.vespo_k_neg, lambda_neg=args.vespo_lambda_neg)
    return -phi * advantages * logps


def _grpo_reduce(trainer, masked, mask, inputs):
    """``masked = ℓ·m`` ``[B, K]`` reduced to the scalar loss as ``trainer.loss_type`` does."""
    kind, training = trainer.loss_type, trainer.model.training
    accumulation = trainer.current_gradient_accumulation_steps if training else 1.0
    if kind in ("grpo", "sapo"):
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    if kind == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / accumulation
    if kind == "dr_grpo":
        return masked.sum() / (masked.shape[0] * trainer.max_completion_length) / accumulation
    if kind == "luspo":
        return masked.sum(-1).mean() / accumulation
    # dapo, cispo, vespo: the generation batch's token count, per process and accumulation window
    normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
    if training:
        normalizer = normalizer * trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
    return masked.sum() / normalizer


def reads_entropy(trainer):
    """Whether the trainer's loss differentiates the entropy (GRPO's entropy bonus)."""
    return bool(getattr(trainer, "_entropy_bonus_enabled", False))


def _entropy_bonus(trainer, mask):
    """``H ↦ c·Σ H·m / Σ m / accumulation`` of GRPO's entropy bonus, or None when off; ``c`` read now
    (the adaptive controller updates it at the end of TRL's step, for the next one)."""
    if not reads_entropy(trainer):
        return None
    coef = trainer.entropy_coef
    if trainer.use_adaptive_entropy and not trainer._last_world_entropy <= trainer.args.entropy_target:
        coef = 0.0
    accumulation = trainer.current_gradient_accumulation_steps if trainer.model.training else 1.0
    return lambda entropy: coef * ((entropy * mask).sum() / mask.sum().clamp(min=1.0) / accumulation)


def grpo_objective(trainer, inputs):
    """``loss(logps, entropy)`` of a ``GRPOTrainer`` on ``inputs`` (its ``_prepare_inputs`` output;
    ``entropy`` read only with the entropy bonus); the configurations it covers are the ones
    :mod:`.trl_rl_plan` switches (no entropy quantile mask, no MoE aux loss)."""
    mask = inputs["completion_mask"]
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    advantages = inputs["advantages"]
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old, beta = inputs.get("old_per_token_logps"), trainer.beta
    vllm_weight = None
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction and trainer.loss_type != "vespo":
        vllm_weight = inputs["importance_sampling_ratio"]
    bonus = _entropy_bonus(trainer, mask)

    def loss(logps, entropy=None):
        old_logps = logps.detach() if old is None else old
        log_ratio = logps - old_logps
        log_weight = log_ratio
        if trainer.importance_sampling_level == "sequence":  # the sequence's mean log-ratio
            log_weight = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        ratio = torch.exp(log_weight)
        term = _grpo_term(trainer, logps, log_ratio, ratio, advantages, mask, inputs)
        if trainer.off_policy_mask_threshold is not None:
            term = term * trainer.get_off_policy_mask(
                advantages=advantages, per_token_logps=logps,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old_logps), mask=mask,
                off_policy_threshold=trainer.off_policy_mask_threshold)
        if vllm_weight is not None:
            term = term * vllm_weight
        if beta != 0.0:
            gap = inputs["ref_per_token_logps"] - logps
            kl = torch.exp(gap) - gap - 1
            if trainer.args.use_bias_correction_kl:
                kl = kl * ratio
            term = term + beta * kl
        total = _grpo_reduce(trainer, term * mask, mask, inputs)
        return total if bonus is None else total - bonus(entropy)

    return loss


def rloo_objective(trainer, inputs):
    """``loss(logps, entropy=None)`` of an ``RLOOTrainer`` on ``inputs``: PPO's clipped surrogate on each
    sequence's summed log-prob ratio, averaged over the batch."""
    mask, old, advantages = inputs["completion_mask"], inputs["old_logps"], inputs["advantages"]

    def loss(logps, entropy=None):
        del entropy  # RLOO has no entropy term
        ratio = torch.exp((logps * mask).sum(1) - old)
        return _clipped_surrogate(ratio, advantages, trainer.epsilon_low, trainer.epsilon_high).mean()

    return loss
