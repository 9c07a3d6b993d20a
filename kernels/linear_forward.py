"""Fused-linear forward: per-token softmax statistics of ``x = H·Wᵀ (+ b)`` tile by tile.

A 1-D grid of ``token blocks × vocabulary splits`` programs in grouped order
(:func:`grouped_program`: programs that run together share hidden rows in L2).  A program takes ``BLOCK_M`` labelled tokens
(``rows[m]`` is the hidden row, ``y[m]`` the label: ignored tokens were compacted away
and cost nothing, ``hidden`` is read in place) and loops over the vocabulary tiles of
its split.  Each ``[BLOCK_M, BLOCK_V]`` logits tile is built on-chip by a ``tl.dot``
loop over ``D`` in fp32, transformed (``z = softcap(x·scale)/T``) and folded into
running per-row statistics against the running max ``m``:

    s = Σ e^{z−m}     a = Σ e^{z−m}·(z − m)     q = Σ e^{2(z−m)}     Σ z     z_y (target logit)

(``a`` relative to the running max, re-based as the max moves: the entropy then never
cancels against an LSE at a large common offset of the logits).

The split's statistics go to ``part[stat, split, m]``; the launcher combines splits
(``log p = (z_y − M) − log Σ_k s_k e^{m_k−M}`` and the like), O(tokens · splits) work.  Splitting
the vocabulary keeps the GPU busy when there are few token blocks.
"""
import triton
import triton.language as tl

from .linear_tile import grouped_program, logits_tile
from .tl_utils import transform


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
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, split = grouped_program(tl.cdiv(M, BLOCK_M), n_splits, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    in_m = offs_m < M
    rows = tl.load(rows_ptr + offs_m, mask=in_m, other=0).to(tl.int64)
    y = tl.load(y_ptr + offs_m, mask=in_m, other=-1).to(tl.int64)
    cols = tl.arange(0, BLOCK_V).to(tl.int64)

    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    a_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    q_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    zsum_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    zy_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + cols
        in_v = offs_v < V
        acc = logits_tile(h_ptr, stride_hn, stride_hd, w_ptr, stride_wv, stride_wd, b_ptr,
                          rows, in_m, offs_v, in_v, D, HAS_BIAS, DOT_FP32, INPUT_PRECISION,
                          BLOCK_M, BLOCK_V, BLOCK_D)
        z = transform(acc, scale, inv_temp, softcap, HAS_SOFTCAP)
        if WANT_MEAN:
            zsum_i += tl.sum(tl.where(in_v[None, :], z, 0.0), axis=1)
        zy_i += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), axis=1)
        z = tl.where(in_v[None, :], z, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        # Rows still at −inf (nothing seen yet) exponentiate against 0: no inf − inf.
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_ref)
        d = z - m_ref[:, None]
        e = tl.exp(d)
        if WANT_ENTROPY:
            # Σ e·(z − m_new) = α·(a + s·(m_old − m_new)) + Σ_tile; e·d is 0·(−inf) where e = 0.
            shift = tl.where(m_i == -float("inf"), 0.0, m_i - m_ref)
            a_i = (a_i + s_i * shift) * alpha + tl.sum(e * tl.where(e > 0.0, d, 0.0), axis=1)
        s_i = s_i * alpha + tl.sum(e, axis=1)
        if WANT_LSQ:
            q_i = q_i * (alpha * alpha) + tl.sum(e * e, axis=1)
        m_i = m_new

    # part is [6, n_splits, M] fp32: m, s, z_y, a, q, Σz.
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
