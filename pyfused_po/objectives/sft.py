"""``sft``: the supervised term of TRL's DPOTrainer as a loss of its own (used in MPO mixes)."""
from .registry import ObjectiveOutput, PairBatch, register_objective


# uses_f_divergence: it has no log-ratio to transform, so any f_divergence_type may accompany it.
@register_objective("sft", needs_reference=False, uses_f_divergence=True)
def sft(batch: PairBatch, *, beta):
    """−Σ_pairs ℓ^nll_w / Σ_pairs n^nll_w, the token-mean NLL of the chosen responses over the
    batch, repeated for every pair (so the mean over pairs is that NLL).  Rewards are β·r when
    reference log-probs are given, else β·ℓ."""
    nll = batch.nll()
    losses = nll.expand(batch.chosen_logps.shape[0])
    if batch.ref_chosen_logps is not None and batch.ref_rejected_logps is not None:
        chosen, rejected = batch.logratios()
    else:
        chosen, rejected = batch.chosen_logps, batch.rejected_logps
    return ObjectiveOutput(losses, beta * chosen, beta * rejected, {"nll_loss": nll})
