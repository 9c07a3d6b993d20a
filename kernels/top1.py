"""The row's first largest logit, as ``argmax`` picks it (the lowest index wins a tie), for
the token forward kernel's ``is_top1``: 1 exactly when the label is that index.

The row is walked as ``kernels/row_split.py`` splits it, and the index is found without a
per-element index in the main loop:

* body (unmasked blocks): each lane row (``LANE`` consecutive ids of a block) keeps the trip
  of its last *strict* rise of the running max key, i.e. the trip where its final max first
  appears (one compare and one select per lane row per trip).  After the loop, the first
  maximizer of the body lies in the lane row with that max at the lowest position
  ``trip·BLOCK_V + lane offset``; its ``LANE`` ids are read once more to find it exactly;
* edge (head and tail, at most two masked blocks, visited in increasing id order by
  ``edge_index``): its max key and first index are kept element by element;
* the row's first maximizer is the lower of the two candidates that reach the row's max.

Ties are decided on the logit keys (``fast_math.logit_key``), which order the ids as the
transformed logits ``z`` do.
"""
import triton
import triton.language as tl

from .fast_math import logit_key
from .row_split import vocab_offset


@triton.jit
def first_max_merge(key, idx, inside, best_k, best_first, V):
    """Merges a masked block (``key`` −inf where not ``inside``, row ids ``idx``; blocks arrive
    in increasing id order) into the running ``(max key, its first id)``; ``V`` = none yet."""
    block_k = tl.max(tl.max(key, axis=1), axis=0)
    block_first = tl.min(tl.min(tl.where(inside & (key == block_k), idx, V), axis=1), axis=0)
    first = tl.where(block_k > best_k, block_first,
                     tl.where(block_k == best_k, tl.minimum(best_first, block_first), best_first))
    return tl.maximum(best_k, block_k), first


@triton.jit
def body_first_max(x_body, stride_xv, k_l, trip_l, n_full, head, V,
                   scale, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr, FLIP: tl.constexpr,
                   BLOCK_V: tl.constexpr, LANE: tl.constexpr, ALIGN: tl.constexpr):
    """``(max key, its first row id)`` of the body, right after the body loop: ``k_l``/``trip_l``
    the per-lane-row max keys and trips of their first appearance (``V`` when there is no body).
    Taken before the edge loop, so that only two scalars, not the lane rows, live through it."""
    body_k = tl.max(k_l, axis=0)
    pos_l = trip_l * BLOCK_V + tl.arange(0, BLOCK_V // LANE) * LANE
    seg = tl.min(tl.where(k_l == body_k, pos_l, n_full * BLOCK_V), axis=0)
    j = tl.arange(0, LANE)
    inside = seg + j < n_full * BLOCK_V  # nothing when the row has no body
    x = tl.load(x_body + vocab_offset(seg + j, ALIGN) * stride_xv, mask=inside, other=0.0)
    key = logit_key(x, scale, inv_temp, softcap, HAS_SOFTCAP, FLIP)
    # ≥ rather than ==: the re-read key is the loop's key, and anything at the max is a maximizer.
    return body_k, head + tl.min(tl.where(inside & (key >= body_k), seg + j, V - head), axis=0)


@triton.jit
def first_max_index(body_k, body_first, edge_k, edge_first, V):
    """Row id of the first largest logit (int32) from the body's and the edge's candidates."""
    top = tl.maximum(body_k, edge_k)
    return tl.minimum(tl.where(body_k == top, body_first, V), tl.where(edge_k == top, edge_first, V))
