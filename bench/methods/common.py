"""The loss every peer adapter ends with: DPO (sigmoid, β = 0.1) on summed log-probs.

Written here independently of pyfused_po (the pyfused adapters use the library's own
``preference_loss``), so that the value check compares two implementations.
"""
import torch.nn.functional as F

from ..reference import BETA


def pair_sums(token_logps, pairs):
    """Per-token log-probs ``[2P, T]`` (or flat ``[2P·T]``) → summed ``(chosen, rejected)``."""
    sums = token_logps.reshape(2 * pairs, -1).float().sum(-1)
    return sums[:pairs], sums[pairs:]


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=BETA):
    """Mean over pairs of ``−log σ(β·((c − c_ref) − (r − r_ref)))``."""
    h = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -F.logsigmoid(h).mean()


def token_dpo(token_logps, inputs, pairs):
    """DPO loss from per-token log-probs of a ``[chosen; rejected]`` batch."""
    chosen, rejected = pair_sums(token_logps, pairs)
    return dpo_loss(chosen, rejected, inputs.ref_chosen, inputs.ref_rejected)
