"""pyfused_po: fused Triton kernels for preference-optimization losses (DPO and family).

Three stages (see docs/architecture.md in the repository): the token stage
(:func:`token_logprobs`, Triton), the sequence stage (:mod:`pyfused_po.sequence`) and
the objective stage (:func:`preference_loss` over a registry of losses), chained by
the drop-in :class:`FusedPreferenceLoss`.
"""
from .token import ops  # noqa: F401  (registers the torch.library custom ops used under torch.compile)
from .sequence import packing  # noqa: F401  (registers the packed form of sequence_sums)
from .sequence.batch_layout import BatchLayout
from .distributed import sequence_parallel_sums, vocab_parallel_linear_token_logprobs, vocab_parallel_token_logprobs
from .modules.kto import FusedKTOLoss, KTOLossOutput, kto_loss
from .token.linear_token_logprobs import linear_token_logprobs
from .objectives.listwise_loss import ListwiseLossOutput, listwise_preference_loss
from .plans.listwise_stages import listwise_loss_from_hidden, listwise_loss_from_logits
from .modules.preference import FusedPreferenceLoss
from .objectives import F_DIVERGENCE_TYPES, ObjectiveOutput, PairBatch, loss_types, register_objective
from .modules.expo import expo_from_logits, expo_loss
from .objectives.preference_loss import PreferenceLossOutput, preference_loss
from .sequence.sums import SequenceSums, sequence_sums
from .token.token_kl import TokenKL, token_kl
from .token.token_logprobs import TokenLogprobs, token_logprobs

__version__ = "0.1.0"

__all__ = [
    "BatchLayout",
    "F_DIVERGENCE_TYPES",
    "FusedKTOLoss",
    "FusedPreferenceLoss",
    "KTOLossOutput",
    "ListwiseLossOutput",
    "ObjectiveOutput",
    "PairBatch",
    "PreferenceLossOutput",
    "SequenceSums",
    "TokenKL",
    "TokenLogprobs",
    "expo_from_logits",
    "expo_loss",
    "kto_loss",
    "linear_token_logprobs",
    "listwise_loss_from_hidden",
    "listwise_loss_from_logits",
    "listwise_preference_loss",
    "loss_types",
    "preference_loss",
    "register_objective",
    "sequence_parallel_sums",
    "sequence_sums",
    "token_kl",
    "token_logprobs",
    "vocab_parallel_linear_token_logprobs",
    "vocab_parallel_token_logprobs",
    "__version__",
]
