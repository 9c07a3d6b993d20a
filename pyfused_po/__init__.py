"""pyfused_po: fused Triton kernels for preference-optimization losses (DPO and family).

Three stages (see ARCHITECTURE in the repository): the token stage
(:func:`token_logprobs`, Triton), the sequence stage (:mod:`pyfused_po.sequence`) and
the objective stage (:func:`preference_loss` over a registry of losses), chained by
the drop-in :class:`FusedPreferenceLoss`.
"""
from .module import FusedPreferenceLoss
from .objectives import ObjectiveOutput, PairBatch, loss_types, register_objective
from .preference_loss import PreferenceLossOutput, preference_loss
from .sequence import SequenceSums, sequence_sums
from .token_logprobs import TokenLogprobs, token_logprobs

__version__ = "0.1.0"

__all__ = [
    "FusedPreferenceLoss",
    "ObjectiveOutput",
    "PairBatch",
    "PreferenceLossOutput",
    "SequenceSums",
    "TokenLogprobs",
    "loss_types",
    "preference_loss",
    "register_objective",
    "sequence_sums",
    "token_logprobs",
    "__version__",
]
