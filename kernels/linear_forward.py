"""Fused-linear forward: per-token softmax statistics of ``x = H·Wᵀ (+ b)`` tile by tile.

A 1-D grid of ``token blocks × vocabulary splits`` programs in grouped order
(:func:`grouped_program`: programs that run together share hidden rows in L2).  A program takes ``BLOCK_M`` labelled tokens
(``rows[m]`` is the hidden row, ``y[m]`` the label: ignored tokens were compacted away
and cost nothing, ``hidden`` is read in place) and loops over the vocabulary tiles of
its split.  Each ``[BLOCK_M, BLOCK_V]`` logits tile is built on-chip by a ``tl.dot``
loop over ``D`` in fp32 and folded into running per-row statistics against the running
max, taken on the logit key of ``kernels/fast_math.py`` (±x without a softcap, the logit
``z = softcap(x·scale)/T`` with one; ``z = key·kz``):

    s = Σ e^{z−m}     a = Σ e^{z−m}·(key − k_max)     q = Σ e^{2(z−m)}     Σ z     key_y (target)

and, for ``is_top1``, whether the label is the split's first id at its max key (``argmax``'s rule)

with e^{z−m} = e^{(key − k_max)·kz}: the key difference is exact near the max, so neither
``z = x·scale/T`` nor ``z − m`` is rounded to the ulp of a large |z| (4e-4 at T = 0.7 and
|x| = 1e4, 0.75 at T = 1e-3).  ``a`` is relative to the running max, re-based as the max
moves: the entropy then never cancels against an LSE at a large common offset.

The split's statistics go to ``part[stat, split, m]`` (max key, ``a`` and ``key_y`` in key
units); the launcher combines splits (``log p = (key_y − K)·kz − log Σ_k s_k e^{(k_k−K)·kz}`` and
the like), O(tokens · splits) work.  Splitting
the vocabulary keeps the GPU busy when there are few token blocks.
"""
import triton
import triton.language as tl

from .fast_math import key_logit, key_scales, logit_key, max_logit
from .linear_tile import grouped_program, logits_tile


@triton.jit
def linear_forward_kernel(
    h_ptr, stride_hn, stride_hd,
    w_ptr, stride_wv, stride_wd,
    b_ptr, rows_ptr, y_ptr, part_ptr,
    M, V, D, tiles_per_split, n_splits,
    scale, inv_temp, softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    WANT_LSQ: tl.constexpr,
    WANT_MEAN: tl.constexpr,
    WANT_TOP1: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_M: tl.constexpr,
    FLIP: tl.constexpr,
):
    pid_m, split = grouped_program(tl.cdiv(M, BLOCK_M), n_splits, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    in_m = offs_m < M
    rows = tl.load(rows_ptr + offs_m, mask=in_m, other=0).to(tl.int64)
    y = tl.load(y_ptr + offs_m, mask=in_m, other=-1).to(tl.int64)
    cols = tl.arange(0, BLOCK_V).to(tl.int64)

    kz, ku = key_scales(scale, inv_temp, HAS_SOFTCAP, FLIP)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)  # running max key
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    a_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    q_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    zsum_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    zy_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # the target's key
    first_i = tl.zeros([BLOCK_M], dtype=tl.int64) + V  # WANT_TOP1: first id at the running max

    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + cols
        in_v = offs_v < V
        acc = logits_tile(h_ptr, stride_hn, stride_hd, w_ptr, stride_wv, stride_wd, b_ptr,
                          rows, in_m, offs_v, in_v, D, HAS_BIAS, DOT_FP32, INPUT_PRECISION,
                          BLOCK_M, BLOCK_V, BLOCK_D)
        key = logit_key(acc, scale, inv_temp, softcap, HAS_SOFTCAP, FLIP)
        if WANT_MEAN:
            zsum_i += tl.sum(tl.where(in_v[None, :], key_logit(key, kz, HAS_SOFTCAP), 0.0), axis=1)
        zy_i += tl.sum(tl.where(offs_v[None, :] == y[:, None], key, 0.0), axis=1)
        key = tl.where(in_v[None, :], key, -float("inf"))
        tile_max = tl.max(key, axis=1)
        m_new = tl.maximum(m_i, tile_max)
        if WANT_TOP1:
            # argmax's tie rule: tiles come in increasing id order, so only a strict rise moves
            # the first maximizer, to the tile's lowest id at its max.
            tile_first = tl.min(tl.where(key == tile_max[:, None], offs_v[None, :], V), axis=1)
            first_i = tl.where((tile_max > m_i) | (first_i == V), tile_first, first_i)
        # Rows still at −inf (nothing seen yet) exponentiate against 0: no inf − inf.
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2((m_i - m_ref) * ku)
        d = key - m_ref[:, None]  # exact near the max (Sterbenz)
        e = tl.exp2(d * ku)
        if WANT_ENTROPY:
            # Σ e·(key − k_new) = α·(a + s·(k_old − k_new)) + Σ_tile; e·d is 0·(−inf) where e = 0.
            shift = tl.where(m_i == -float("inf"), 0.0, m_i - m_ref)
            a_i = (a_i + s_i * shift) * alpha + tl.sum(e * tl.where(e > 0.0, d, 0.0), axis=1)
        s_i = s_i * alpha + tl.sum(e, axis=1)
        if WANT_LSQ:
            q_i = q_i * (alpha * alpha) + tl.sum(e * e, axis=1)
        m_i = m_new

    # part is [9, n_splits, M] fp32: max key, s, key_y, a (key units), q, Σz, the max logit
    # m = fl(k_max·kz) with its rounding error, and the top-1 flag (fast_math.max_logit: the LSE pair's lo carries it,
    # with kz as this kernel forms it, for the backward's fma(x, scale/T, −hi)).
    stat = n_splits * M
    base = part_ptr + split * M + offs_m
    tl.store(base, m_i, mask=in_m)
    tl.store(base + stat, s_i, mask=in_m)
    tl.store(base + 2 * stat, zy_i, mask=in_m)
    if WANT_ENTROPY:
        tl.store(base + 3 * stat, a_i, mask=in_m)
    if WANT_LSQ:
        tl.store(base + 4 * stat, q_i, mask=in_m)
    if WANT_MEAN:
        tl.store(base + 5 * stat, zsum_i, mask=in_m)
    if WANT_TOP1:  # whether the label is this split's first maximizer
        tl.store(base + 8 * stat, (first_i == y).to(tl.float32), mask=in_m)
    m_top, m_err = max_logit(m_i, kz, HAS_SOFTCAP)
    tl.store(base + 6 * stat, m_top, mask=in_m)
    tl.store(base + 7 * stat, m_err, mask=in_m)
