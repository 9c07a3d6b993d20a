"""Combining per-rank vocabulary-slice statistics into the full-vocabulary token results.

Rank r holds the logits of the vocabulary slice ``[start_r, start_r + V_r)``.  Its
token stage (``vocab_shard`` mode) gives, per token, the slice's

    lse_r = log Σ_{v∈r} e^{z_v} (a pair),   z_y (only on the rank that owns the label),
    H_r   = entropy of the slice's own softmax,   S_r = log Σ_{v∈r} p_{r,v}²,
    Z_r   = Σ_{v∈r} z_v,   M_r = max_{v∈r} z_v.

Each LSE travels as the pair ``(hi, lo)`` of the token-stage contract (LSE = hi + lo,
``kernels/lse_pair.py``).  With ``H = max_r hi_r``, ``ℓ_r = (hi_r − H) + lo_r`` (exact near
the max), ``L = log Σ_r e^{ℓ_r}`` (so lse = H + L) and the slice weights
``w_r = e^{ℓ_r − L}`` (the probability mass of slice r), the full-vocabulary values are

    log p_y        = (z_y − H) − L
    entropy        = Σ_r w_r·(H_r − log w_r)               (Σ_r w_r = 1)
    log Σ_v p_v²   = log Σ_r e^{2 log w_r + S_r}
    mean_logit     = Σ_r Z_r / Σ_r V_r
    is_top1        = [z_y ≥ max_r M_r, and the lowest rank reaching it owns y]   (argmax's tie rule)

and the combined LSE is the pair of ``H + L``: nothing is rounded to the ulp of a large
common offset of the logits.
All statistics of one rank travel in one ``[K, n + 1]`` tensor (the last column
carries the rank's ``V_r`` and ``start_r``), so the forward needs exactly one
collective: an ``all_gather``.
"""
import dataclasses

import torch
import torch.distributed as dist

from ..token.torch_backend.token import lse_pair
from ..validation import check_label_range

# Order of the per-extra statistic rows after the LSE-pair (hi, lo) and target-logit rows.
STAT_EXTRAS = ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1")


# Slice-relative labels take values in [0, V_r) or these two negative codes, and the slice kernels
# run with ignore_index=SLICE_IGNORE.  The caller's ignore_index must not reach them: a
# non-negative one (e.g. 0, a pad id) equals the relative label of id vocab_start + ignore_index,
# which the kernels would then skip on its owner rank (a wrong lse and log-prob for that token).
OTHER_RANK = -1
SLICE_IGNORE = -2


def slice_labels(labels, vocab_start, vocab_local, ignore_index):
    """Labels relative to this rank's slice, int64, for kernels run with
    ``ignore_index=SLICE_IGNORE`` (:func:`slice_config`).  A label another rank owns becomes
    :data:`OTHER_RANK`, so the kernels still reduce the row but neither read a target logit nor
    apply the one-hot term there; a label equal to ``ignore_index`` becomes :data:`SLICE_IGNORE`."""
    rel = labels.long() - int(vocab_start)
    mine = (rel >= 0) & (rel < vocab_local)
    out = torch.where(mine, rel, torch.full_like(rel, OTHER_RANK))
    return torch.where(labels == ignore_index, torch.full_like(rel, SLICE_IGNORE), out)


def slice_config(config):
    """``config`` (a :class:`~pyfused_po.token.token_logprobs.TokenConfig`) for kernels reading
    :func:`slice_labels` output: the same transform and extras, ``ignore_index=SLICE_IGNORE``."""
    return dataclasses.replace(config, ignore_index=SLICE_IGNORE)


def pack_stats(lse, target_logit, outs, extras, vocab_local, vocab_start):
    """``[K, n + 1]``: rows hi_r, lo_r (``lse``: the slice's ``[..., 2]`` LSE pairs), z_y and one
    per extra (in ``extras`` order, ``mean_logit`` turned into the slice sum Z_r); the last
    column holds ``(V_r, start_r, 0, …)``."""
    pairs = lse.reshape(-1, 2)
    rows = [pairs[:, 0], pairs[:, 1], target_logit.reshape(-1)]
    for name in extras:
        value = outs[name].reshape(-1)
        rows.append(value * vocab_local if name == "mean_logit" else value)
    stats = torch.stack(rows)
    meta = torch.zeros(stats.shape[0], 1, dtype=stats.dtype, device=stats.device)
    meta[0, 0], meta[1, 0] = float(vocab_local), float(vocab_start)
    return torch.cat([stats, meta], dim=1)


def all_gather_stats(stats, group):
    """The vocabulary-parallel forward's one collective: ``[K, m]`` per rank → ``[W, K, m]``."""
    parts = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, stats.contiguous(), group=group)
    return torch.stack(parts)


def check_layout(gathered, labels, ignore_index):
    """The slices must tile ``[0, V)`` in rank order; labels must lie in ``[0, V)``.

    Returns the full vocabulary size ``V``.  Runs after the collective (the layout is
    only known then); every rank raises the same error.
    """
    sizes = [int(v) for v in gathered[:, 0, -1].tolist()]
    starts = [int(s) for s in gathered[:, 1, -1].tolist()]
    expected = [sum(sizes[:r]) for r in range(len(sizes))]
    if starts != expected:
        raise ValueError(
            "vocab_start must place the ranks' vocabulary slices end to end in rank order "
            f"(slice sizes {sizes} need vocab_start {expected}), got vocab_start {starts}"
        )
    total = sum(sizes)
    check_label_range(labels, total, ignore_index)
    return total


def _first_max_is_label(top, z_y, starts, sizes, labels):
    """``argmax == label`` over the full vocabulary, the lowest id winning a tie: ``top [W, n]``
    holds each slice's max (+inf on the owner where an earlier id of its slice ties or beats
    the label), so the label is the first maximizer iff ``z_y`` reaches the largest ``top`` and
    the lowest rank that reaches it owns the label."""
    best = top.max(0).values
    first_rank = (top == best).to(torch.int8).argmax(0, keepdim=True)  # argmax: the first such rank
    lab = labels.reshape(1, -1).to(starts.dtype)
    owner = (lab >= starts[:, None]) & (lab < (starts + sizes)[:, None])
    return (z_y >= best) & owner.gather(0, first_rank)[0]


def combine_stats(gathered, extras, labels):
    """Full-vocabulary ``(logp, lse, {extra: value})`` per token from ``[W, K, n + 1]``
    gathered statistics (module docstring; ``lse`` as ``[n, 2]`` pairs) and the ``n`` tokens'
    global labels (for ``is_top1``: which rank owns each); values of ignored tokens are
    meaningless and the caller masks them."""
    g = gathered[..., :-1]
    hi_r, lo_r, z_y = g[:, 0], g[:, 1], g[:, 2].sum(0)  # only the owner's z_y is non-zero
    top = hi_r.max(0).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    ell = (hi_r - top) + lo_r  # lse_r − H, exact near the max
    big_l = torch.logsumexp(ell, dim=0)
    # A slice whose logits are all −inf has lse_r = −inf, weight 0 and undefined H_r, S_r:
    # every term from it is replaced by the value of an empty contribution.
    alive = hi_r > -float("inf")
    log_w = ell - big_l
    out = {}
    for k, name in enumerate(extras):
        v = g[:, 3 + k]
        if name == "entropy":
            out[name] = torch.where(alive, log_w.exp() * (v - log_w), torch.zeros_like(v)).sum(0)
        elif name == "log_sum_sq_probs":
            out[name] = torch.logsumexp(torch.where(alive, 2.0 * log_w + v, torch.full_like(v, -float("inf"))), 0)
        elif name == "mean_logit":
            out[name] = v.sum(0) / gathered[:, 0, -1].sum()
        elif name == "is_top1":
            out[name] = _first_max_is_label(v, z_y, gathered[:, 1, -1], gathered[:, 0, -1], labels).to(v.dtype)
    return (z_y - top) - big_l, lse_pair(top, big_l), out

