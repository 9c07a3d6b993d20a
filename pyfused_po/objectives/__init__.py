"""The objective registry; importing this package registers every built-in loss."""
from . import dpo  # noqa: F401  (registers its losses)
from .registry import (
    ObjectiveOutput,
    PairBatch,
    get_objective,
    loss_types,
    register_objective,
)

__all__ = ["ObjectiveOutput", "PairBatch", "get_objective", "loss_types", "register_objective"]
