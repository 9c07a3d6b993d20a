"""The truncation of a TRL RL trainer's sampler, for ``apply(trainer, truncated_support=True)`` (issue 28).

``GRPOTrainer`` / ``RLOOTrainer`` sample completions with ``top_k`` / ``top_p`` / ``min_p`` at their
temperature, then score them under the full ``softmax(z / T)``: the importance ratio
``π_train / π_sampler`` then compares two different distributions.  With the opt-in, the policy's
per-token log-probs (the loss's and the old-log-prob pass's) are ``log p̃`` under the sampler's
truncated distribution (:func:`pyfused_po.integrations.rl.rl_token_logprobs`, Hugging Face's warper
order, or vLLM's when the trainer samples with vLLM).  The reference model keeps the full softmax
(TRL's KL compares full distributions).
"""

__all__ = ["sampler_truncation"]

# Generation settings that change the sampler's distribution beyond temperature and truncation.
_DISTRIBUTION_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "typical_p", "epsilon_cutoff",
                      "eta_cutoff", "do_sample", "presence_penalty", "frequency_penalty")


def sampler_truncation(trainer):
    """``dict(top_k=, top_p=, min_p=, sampler_order=)`` of ``trainer``'s sampler (each ``None`` when
    off), for :func:`~pyfused_po.integrations.rl.rl_token_logprobs`.  ``ValueError`` naming every
    reason the trainer's sampler cannot be reproduced: not a ``GRPOTrainer`` / ``RLOOTrainer``, a
    repetition penalty or ``generation_kwargs`` that change the distribution, a reference that is the
    policy itself (PEFT without a reference model, β ≠ 0: it would be truncated too), or no
    truncation at all."""
    from trl import GRPOTrainer, RLOOTrainer

    if not isinstance(trainer, (GRPOTrainer, RLOOTrainer)):
        raise ValueError(f"truncated_support=True takes a GRPOTrainer or RLOOTrainer (a trainer that samples); "
                         f"got {type(trainer).__name__}")
    refusals = []
    if getattr(trainer, "repetition_penalty", 1.0) not in (None, 1.0):
        refusals.append(f"repetition_penalty={trainer.repetition_penalty} changes the sampler's distribution "
                        "with the context")
    overridden = sorted(set(getattr(trainer.args, "generation_kwargs", None) or {}) & set(_DISTRIBUTION_KEYS))
    if overridden:
        refusals.append(f"generation_kwargs sets {overridden}, which pyfused_po does not read back")
    if getattr(trainer, "beta", 0.0) != 0.0 and getattr(trainer, "ref_model", None) is None:
        refusals.append("the reference is the policy with its adapter disabled (PEFT, no ref_model), whose "
                        "log-probs would be truncated too")
    top_k = trainer.top_k if trainer.top_k is not None and trainer.top_k > 0 else None
    top_p = trainer.top_p if trainer.top_p is not None and trainer.top_p < 1.0 else None
    min_p = trainer.min_p if trainer.min_p else None
    if top_k is None and top_p is None and min_p is None:
        refusals.append("the sampler does not truncate (top_k, top_p and min_p are off): nothing to match")
    if refusals:
        raise ValueError("truncated_support=True: " + "; ".join(refusals))
    return dict(top_k=top_k, top_p=top_p, min_p=min_p, sampler_order="vllm" if trainer.use_vllm else "hf")
