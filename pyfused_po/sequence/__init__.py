"""The sequence stage: per-token values into per-sequence values.

Masks, label shift, sums, token counts, length averaging, token weights, LD-DPO's split
(sums.py); packed streams (packing.py, packed_columns.py, packed_checks.py); the one batch
representation (batch_layout.py) and its forms for pairs (preference_batch.py), single
sequences (kto_batch.py) and groups of K (groups.py).
"""
from .sums import SequenceSums, label_mask, sequence_sums  # noqa: F401  (the stage's public entry)
