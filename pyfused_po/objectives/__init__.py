"""The objective registry; importing this package registers every built-in loss."""
from . import apo, aot, dpo, orpo, pairwise, reference_free, sft  # noqa: F401  (register their losses)
from . import expo  # noqa: F401
from . import listwise  # noqa: F401  (listwise losses, also registered as pair losses)
from .registry import ObjectiveOutput, PairBatch, get_objective, loss_types, register_objective
from .transforms import F_DIVERGENCE_TYPES, f_divergence_scores

__all__ = ["F_DIVERGENCE_TYPES", "ObjectiveOutput", "PairBatch", "f_divergence_scores", "get_objective",
           "loss_types", "register_objective"]
