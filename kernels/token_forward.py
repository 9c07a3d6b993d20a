"""Token stage, forward: per-token log p(label) and the row's log-sum-exp in one read.

One program handles one logits row ``(b, t)`` of a ``[B, T, V]`` view (any strides).
With ``SHIFT`` the row's label is ``labels[b, t + 1]`` and the result is written at
position ``t + 1`` (outputs are aligned with the labels); the last row has no label.

Online log-sum-exp over vocabulary blocks of ``BLOCK_V`` (running max ``m``):

    s ← s·e^{m_old − m} + Σ e^{z − m}                 log p_y = (z_y − m) − log s
    a ← (a + s·(m_old − m))·e^{m_old − m}
        + Σ e^{z − m}·(z − m)                        entropy  H = log s − a / s
    q ← q·e^{2(m_old − m)} + Σ e^{2(z − m)}           log Σ p² = log q − 2 log s
    Σ z                                               mean_logit = Σ z / V

Every quantity is relative to the max, so nothing cancels at a large common offset of the
logits; the row's LSE ``m + log s`` is stored as the pair ``(hi, lo)`` of
``kernels/lse_pair.py`` (``lse[row, 0:2]``) for the backward.
``is_top1`` is 1 exactly when the label is the row's ``argmax``, ties going to the lowest id
(``kernels/top1.py``).  Each extra is computed only when its constexpr flag is set.  Rows whose label is
``ignore_index`` are never read and produce 0 everywhere.

``VOCAB_SHARD`` (vocabulary parallelism): the row is one rank's slice of the
vocabulary and the label, given relative to the slice, may fall outside
``[0, V)`` (the target lives on another rank).  The row is still reduced — ``lse``,
entropy, log Σ p² and the mean are the *shard's* statistics, to be combined across
ranks — and two outputs change meaning: ``logp`` holds the raw target logit z_y
(0 when the label is not in the slice) and ``top1`` holds the shard's max logit, or +inf when
the label is in the slice but an earlier id of it ties or beats the label (``argmax``'s rule:
the label cannot be the row's first maximizer then).

Layout (``kernels/row_split.py``): an unmasked, 16-byte-aligned body of whole blocks and
a masked edge (head + tail).  Each block is ``[BLOCK_V // LANE, LANE]`` and every lane row
keeps its own running max and sums (``m_l, s_l, …``); the lane rows are combined once
after the loop (weights e^{m_l − m}).  The running max is taken on a key (±x without a
softcap: no multiply) and the exponentials in base 2, e^{z − m} = 2^{(key − k_max)·ku} with
``ku = scale/T·log2 e`` (log2 e folded into the scale) and a flush-to-zero MUFU.EX2
(``kernels/fast_math.py``).  The maximum's own term is 2⁰ = 1 exactly and ``m`` is the max
logit exactly as ``transform`` computes it, as before.
"""
import triton
import triton.language as tl

from .fast_math import LN2, body_keys, exp2_ftz, key_logit, key_scales, logit_key, max_logit, reads_words, word_block
from .lse_pair import lse_pair
from .row_frame import FLT_MAX, combine_lanes, fma_sum, lane_frame, unshift
from .row_split import block_step, edge_index, lane_offsets, row_split, vocab_offset
from .tl_utils import row_target, transform
from .top1 import body_first_max, first_max_index, first_max_merge


@triton.jit
def _fold_block(key, k_l, nmk_l, s_l, a_l, q_l, ku, nku, WANT_ENTROPY: tl.constexpr, WANT_LSQ: tl.constexpr,
                GUARD: tl.constexpr):
    """Folds a ``[R, LANE]`` block of logit keys (``fast_math.logit_key``; −inf where absent)
    into the per-lane-row running max key ``k_l`` and, in the frame ``mk_l = fl(k_l·ku)`` of
    :mod:`kernels.row_frame` (carried negated, ``nmk_l``; ``nku = −ku``), the sums ``s_l`` (Σ e),
    ``a_l`` (Σ e·t) and ``q_l`` (Σ e²), all ``[R]``, with ``t = fma(key, ku, −mk_l)`` and ``e = 2^t``.

    One FFMA and one MUFU.EX2 per element: the product ``key·ku`` is exact inside the FMA, so
    ``t`` is ``(key − k_l)·ku`` plus the lane row's rounding error of ``mk_l``, a common shift that
    ``row_frame`` removes once per row.  When the max grows, the old sums move to the new frame by
    ``δ = mk_old − mk_new``: ``s ← 2^δ·s``, ``a ← 2^δ·(a + δ·s)``, ``q ← 2^{2δ}·q``.  The products
    ``e·t`` and ``e²`` are summed in FFMA chains (``row_frame.fma_sum``).

    Without ``GUARD`` (the unmasked body) a −inf logit makes ``e·t = 0·(−inf)`` NaN in ``a_l``; the
    kernel re-sums such rows (:func:`_exact_sums`).  With ``GUARD`` (the masked edge, whose absent
    entries are −inf) ``t`` is floored at −FLT_MAX, which changes no finite ``t``.  Also returns
    whether each lane row's max rose strictly (``is_top1``'s trip)."""
    block_k = tl.max(key, axis=1)
    rise = block_k > k_l  # the lane row's max rises strictly in this block (is_top1's trip)
    k_new = tl.maximum(k_l, block_k)
    nmk_new = lane_frame(k_new, nku)
    delta = nmk_new - nmk_l
    alpha = exp2_ftz(delta)
    t = tl.fma(key, ku, nmk_new[:, None])
    e = exp2_ftz(t)
    if WANT_ENTROPY:
        if GUARD:
            t = tl.maximum(t, -FLT_MAX)
        a_l = fma_sum((a_l + s_l * delta) * alpha, e, t)
    s_l = s_l * alpha + tl.sum(e, axis=1)
    if WANT_LSQ:
        q_l = fma_sum(q_l * (alpha * alpha), e, e)
    return k_new, nmk_new, s_l, a_l, q_l, rise


@triton.jit
def _edge_load(x_row, pos, head, tail_start, n_edge, stride_xv, scale, inv_temp, softcap,
               HAS_SOFTCAP: tl.constexpr, FLIP: tl.constexpr, ALIGN: tl.constexpr):
    inside = pos < n_edge
    idx = edge_index(pos, head, tail_start)
    x = tl.load(x_row + vocab_offset(idx, ALIGN) * stride_xv, mask=inside, other=0.0)
    key = tl.where(inside, logit_key(x, scale, inv_temp, softcap, HAS_SOFTCAP, FLIP), -float("inf"))
    return key, inside, idx


@triton.jit
def _edge_keys(x_row, e0, k, head, tail_start, n_edge, stride_xv, scale, inv_temp, softcap,
               HAS_SOFTCAP: tl.constexpr, FLIP: tl.constexpr, BLOCK_V: tl.constexpr, LANE: tl.constexpr,
               ALIGN: tl.constexpr):
    """``(key, inside, idx)`` of the edge block at edge position ``e0`` (``kernels/row_split.py``):
    the keys, −inf where the block runs past the edge.  When the body is read as words
    (``fast_math.reads_words``) the edge is read as its even and odd elements and joined the same
    way, so that the lane rows' statistics keep the body's register layout through the edge loop
    (else the compiler moves them to the masked load's layout, many lane rows per thread: spills)."""
    if reads_words(x_row, HAS_SOFTCAP, LANE, ALIGN):
        pos = e0 + 2 * lane_offsets(BLOCK_V // 2, LANE // 2)
        key0, in0, idx0 = _edge_load(x_row, pos, head, tail_start, n_edge, stride_xv, scale, inv_temp, softcap,
                                     HAS_SOFTCAP, FLIP, ALIGN)
        key1, in1, idx1 = _edge_load(x_row, pos + 1, head, tail_start, n_edge, stride_xv, scale, inv_temp, softcap,
                                     HAS_SOFTCAP, FLIP, ALIGN)
        key, inside, idx = word_block(key0, key1), word_block(in0, in1), word_block(idx0, idx1)
    else:
        key, inside, idx = _edge_load(x_row, e0 + k, head, tail_start, n_edge, stride_xv, scale, inv_temp, softcap,
                                      HAS_SOFTCAP, FLIP, ALIGN)
    return key, inside, idx


@triton.jit
def _exact_terms(key, k_ref, ku, s, a, q):
    t = (key - k_ref) * ku
    e = exp2_ftz(t)
    return s + tl.sum(e, axis=1), a + tl.sum(e * tl.maximum(t, -FLT_MAX), axis=1), q + tl.sum(e * e, axis=1)


@triton.jit
def _exact_sums(x_row, x_body, k, head, tail_start, n_edge, stride_xv, k_max, ku, scale, inv_temp, softcap,
                HAS_SOFTCAP: tl.constexpr, FLIP: tl.constexpr, BLOCK_V: tl.constexpr, LANE: tl.constexpr,
                ALIGN: tl.constexpr):
    """``(s, a, q)`` of the whole row in the exact frame of its max key, from key differences
    (``t = (key − k_max)·ku``, −inf logits counting 0): a second pass, only for the rows the
    one-pass frame cannot take — a −inf logit in the body (``e·t`` is 0·(−inf) there, the entropy
    sum NaN) or a max key too large for ``fl(k·ku)`` (|z| > FLT_MAX/log2 e: a row of ``finfo.min``).
    It walks the row as the first pass does (same loads, same layouts)."""
    k_ref = tl.where(k_max == -float("inf"), 0.0, k_max)
    s = tl.zeros([BLOCK_V // LANE], tl.float32)
    a = tl.zeros([BLOCK_V // LANE], tl.float32)
    q = tl.zeros([BLOCK_V // LANE], tl.float32)
    x_block = x_body
    for v0 in range(head, tail_start, BLOCK_V):  # the body (bounds not the first pass's: no predicate kept alive)
        key = body_keys(x_block, stride_xv, scale, inv_temp, softcap, HAS_SOFTCAP, FLIP, BLOCK_V, LANE, ALIGN)
        x_block += block_step(stride_xv, BLOCK_V, ALIGN)
        s, a, q = _exact_terms(key, k_ref, ku, s, a, q)
    for e0 in range(0, n_edge, BLOCK_V):
        key, inside, idx = _edge_keys(x_row, e0, k, head, tail_start, n_edge, stride_xv, scale, inv_temp, softcap,
                                      HAS_SOFTCAP, FLIP, BLOCK_V, LANE, ALIGN)
        s, a, q = _exact_terms(key, k_ref, ku, s, a, q)
    return tl.sum(s, axis=0), tl.sum(a, axis=0), tl.sum(q, axis=0)


@triton.jit
def token_forward_kernel(
    x_ptr, stride_xb, stride_xt, stride_xv,
    y_ptr, stride_yb, stride_yt,
    logp_ptr, lse_ptr, ent_ptr, lsq_ptr, mean_ptr, top1_ptr,
    T, V, ignore_index,
    scale, inv_temp, softcap,
    SHIFT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    WANT_LSQ: tl.constexpr,
    WANT_MEAN: tl.constexpr,
    WANT_TOP1: tl.constexpr,
    VOCAB_SHARD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    LANE: tl.constexpr,
    ALIGN: tl.constexpr,
    FLIP: tl.constexpr,
):
    row, b, t, out, has_label, y = row_target(y_ptr, stride_yb, stride_yt, T, ignore_index, SHIFT)
    if y != ignore_index:
        off = b * stride_xb + t * stride_xt
        x_row = x_ptr + off
        body_off, head, n_full, tail_start, n_edge = row_split(off, V, ALIGN, BLOCK_V)
        k = lane_offsets(BLOCK_V, LANE)
        kz, ku = key_scales(scale, inv_temp, HAS_SOFTCAP, FLIP)
        k_l = tl.full([BLOCK_V // LANE], -float("inf"), tl.float32)
        nku = -ku
        nmk_l = tl.full([BLOCK_V // LANE], FLT_MAX, tl.float32)  # row_frame.lane_frame(−inf)
        s_l = tl.zeros([BLOCK_V // LANE], tl.float32)
        a_l = tl.zeros([BLOCK_V // LANE], tl.float32)
        q_l = tl.zeros([BLOCK_V // LANE], tl.float32)
        zs_l = tl.zeros([BLOCK_V // LANE], tl.float32)
        x_body = x_ptr + body_off
        trip_l = tl.zeros([BLOCK_V // LANE], tl.int32)  # WANT_TOP1: trip of each lane row's max
        x_block = x_body
        for i in range(0, n_full):
            key = body_keys(x_block, stride_xv, scale, inv_temp, softcap, HAS_SOFTCAP, FLIP, BLOCK_V, LANE, ALIGN)
            x_block += block_step(stride_xv, BLOCK_V, ALIGN)
            k_l, nmk_l, s_l, a_l, q_l, rise = _fold_block(key, k_l, nmk_l, s_l, a_l, q_l, ku, nku, WANT_ENTROPY,
                                                         WANT_LSQ, False)
            if WANT_TOP1:
                # Only a strict rise moves it: the trip where the lane row's final max first appears.
                trip_l = tl.where(rise, i, trip_l)
            if WANT_MEAN:
                zs_l += tl.sum(key, axis=1)  # Σ key; z = key·kz is applied once after the loop
        if WANT_TOP1:  # the body's max and its first id, before the edge joins the lane rows
            body_k, body_first = body_first_max(x_body, stride_xv, k_l, trip_l, n_full, head, V, scale, inv_temp,
                                                softcap, HAS_SOFTCAP, FLIP, BLOCK_V, LANE, ALIGN)
        edge_k = tl.full([], -float("inf"), tl.float32)  # WANT_TOP1: the edge's max key, first id
        edge_first = tl.zeros([], tl.int32) + V
        for e0 in range(0, n_edge, BLOCK_V):
            key, inside, idx = _edge_keys(x_row, e0, k, head, tail_start, n_edge, stride_xv, scale, inv_temp, softcap,
                                          HAS_SOFTCAP, FLIP, BLOCK_V, LANE, ALIGN)
            if WANT_MEAN:
                zs_l += tl.sum(tl.where(inside, key, 0.0), axis=1)
            if WANT_TOP1:
                edge_k, edge_first = first_max_merge(key, idx, inside, edge_k, edge_first, V)
            k_l, nmk_l, s_l, a_l, q_l, rise = _fold_block(key, k_l, nmk_l, s_l, a_l, q_l, ku, nku, WANT_ENTROPY,
                                                         WANT_LSQ, True)
        # One combine of the lane rows, then the exact frame of the row's max key (kernels/row_frame.py):
        # the max's own term is 1, so a one-entry row gives log s = 0, lse = z exactly.
        k_max, mk, s_c, a_c, q_c = combine_lanes(k_l, nmk_l, s_l, a_l, q_l)
        s, a, q = unshift(k_max, mk, s_c, a_c, q_c, ku)
        # The max's own term is ≈ 1 in any frame, so s_c < 1/2 (or NaN) means the frame failed; a NaN
        # entropy sum means a −inf logit in the guard-free body.  Such rows take a second pass.
        redo = ~(s_c >= 0.5) & (k_max > -float("inf"))
        if WANT_ENTROPY:
            redo = redo | (a_c != a_c)
        if redo:
            s, a, q = _exact_sums(x_row, x_body, k, head, tail_start, n_edge, stride_xv, k_max, ku, scale,
                                  inv_temp, softcap, HAS_SOFTCAP, FLIP, BLOCK_V, LANE, ALIGN)
        k_ref = tl.where(k_max == -float("inf"), 0.0, k_max)
        m, m_err = max_logit(k_max, kz, HAS_SOFTCAP)
        log_s = tl.log(s)
        hi, lo = lse_pair(m, log_s, m_err)  # kernels/lse_pair.py
        if VOCAB_SHARD:
            # The label may belong to another rank's slice: read it only when it is ours.
            mine = (y >= 0) & (y < V)
            x_y = tl.load(x_row + tl.where(mine, y, 0) * stride_xv, mask=mine, other=0.0)
            z_y = tl.where(mine, transform(x_y, scale, inv_temp, softcap, HAS_SOFTCAP), 0.0)
            tl.store(logp_ptr + out, z_y)
        else:
            key_y = logit_key(tl.load(x_row + y * stride_xv), scale, inv_temp, softcap, HAS_SOFTCAP, FLIP)
            z_y = key_logit(key_y, kz, HAS_SOFTCAP)  # = transform(x_y), bit for bit
            # z_y − m from the key difference, exact near the max, as the sums were; log s ∈
            # [0, log V] is never rounded to the ulp of |m|.
            tl.store(logp_ptr + out, (key_y - k_ref) * kz - log_s)
        tl.store(lse_ptr + 2 * row, hi)
        tl.store(lse_ptr + 2 * row + 1, lo)
        if WANT_ENTROPY:
            # H = log s − Σ p·(z − m), with z − m = t·ln 2 (t = (key − k_max)·ku): no cancellation at large |m|.
            tl.store(ent_ptr + out, log_s - LN2 * (a / s))
        if WANT_LSQ:
            tl.store(lsq_ptr + out, tl.log(q) - 2.0 * log_s)
        if WANT_MEAN:
            tl.store(mean_ptr + out, kz * tl.sum(zs_l, axis=0) / V)  # mean z = kz · Σ key / V
        if WANT_TOP1:
            first = first_max_index(body_k, body_first, edge_k, edge_first, V)
            if VOCAB_SHARD:
                # The slice's max for the combine, or +inf when the label is ours but an earlier
                # id of the slice ties or beats it: then no rank can make it the top-1.
                mine = (y >= 0) & (y < V)
                tl.store(top1_ptr + out, tl.where(mine & (first != y), float("inf"), m))
            else:
                tl.store(top1_ptr + out, (first == y).to(tl.float32))
    else:
        tl.store(lse_ptr + 2 * row, 0.0)
        tl.store(lse_ptr + 2 * row + 1, 0.0)
        if has_label:
            tl.store(logp_ptr + out, 0.0)
            if WANT_ENTROPY:
                tl.store(ent_ptr + out, 0.0)
            if WANT_LSQ:
                tl.store(lsq_ptr + out, 0.0)
            if WANT_MEAN:
                tl.store(mean_ptr + out, 0.0)
            if WANT_TOP1:
                tl.store(top1_ptr + out, 0.0)
