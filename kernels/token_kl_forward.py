"""Token stage, forward: full-vocabulary KL(π_ref ‖ π_θ) per token, one read of both rows.

One program handles logits row ``(b, t)`` of the policy ``z`` and of the reference
``zr`` (two ``[B, T, V]`` views, any strides, the same logit transform applied to both).
With ``SHIFT`` the row's label is ``labels[b, t + 1]`` and the result goes to ``t + 1``
(aligned with the labels, as ``token_forward``).  The label only decides whether the
row counts (``ignore_index`` rows are never read and give 0) and, with ``WANT_LOGP``,
which policy log-prob to return.

Derivation.  With lse = log Σ_v e^{z_v}, lse_r = log Σ_v e^{zr_v} and Σ_v p_ref,v = 1,

    KL = Σ_v p_ref,v (log p_ref,v − log p_θ,v)
       = Σ_v p_ref,v ((zr_v − lse_r) − (z_v − lse))
       = Σ_v p_ref,v (zr_v − z_v) − lse_r + lse.

Online over vocabulary blocks, with running maxima m (policy) and mr (reference):

    s  ← s ·e^{m_old − m}   + Σ e^{z − m}                     lse   = m  + log s
    sr ← sr·e^{mr_old − mr} + Σ e^{zr − mr}                   lse_r = mr + log sr
    a  ← a ·e^{mr_old − mr} + Σ e^{zr − mr}·(zr − z)          Σ p_ref (zr − z) = a / sr

and the result is assembled as  KL = a/sr + (m − mr) + log(s/sr)  rather than from
lse − lse_r: the two LSEs are each ~log V in size, while m − mr and log(s/sr) are
small when the two distributions are close, so their rounding error is too.

Entries with p_ref = 0 (zr = −inf, e.g. a padded vocabulary) contribute 0, not
0·(−inf − z) = NaN; a finite-p_ref entry where z = −inf gives KL = +inf, its true value.

Layout (``kernels/row_split.py``): unmasked 16-byte-aligned body, masked edge, per-lane
running maxima and sums over ``[BLOCK_V // LANE, LANE]`` blocks combined once after the
loop.  Maxima are taken on logit keys (±x without a softcap) and the exponentials in base 2
(``u = z·log2 e``, log2 e folded into the scale) with flush-to-zero ``2^{u − m_u}``
(``kernels/fast_math.py``); ``lse``/``lse_r`` use the exact max logits, ``a`` and the maxima
of the KL return to base e once per row (× ln 2).  A reference probability below 2⁻¹²⁶ of the running
maximum's counts as 0 (with ``tl.exp`` the threshold was 2⁻¹⁴⁹), which matters only for
the ``z = −inf`` case above.
"""
import triton
import triton.language as tl

from .fast_math import LN2, exp2_ftz, key_log2, key_logit, key_scales, logit_key
from .row_split import edge_index, lane_offsets, row_split, vocab_offset
from .tl_utils import row_target, transform


@triton.jit
def _fold_max_sum(key, k_l, m_l, ku):
    """New per-lane-row max key of a ``[R, LANE]`` block of logit keys (old: ``k_l``, its
    base-2 logit ``m_l``), the new one's base-2 logit,
    the factor that rescales the old sums to it, and ``e = 2^{u − m}`` with the block's
    base-2 logits ``u`` (−inf maxima exponentiate against 0: no inf − inf)."""
    k_new = tl.maximum(k_l, tl.max(key, axis=1))
    m_new = key_log2(k_new, ku)
    m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
    u = key_log2(key, ku)
    return k_new, m_new, exp2_ftz(m_l - m_ref), u, exp2_ftz(u - m_ref[:, None])


@triton.jit
def _fold_block(key, key_r, k_l, m_l, s_l, kr_l, mr_l, sr_l, a_l, ku):
    """Folds a block of policy and reference logit keys (−inf where absent)."""
    k_l, m_l, alpha, u, e = _fold_max_sum(key, k_l, m_l, ku)
    s_l = s_l * alpha + tl.sum(e, axis=1)
    kr_l, mr_l, alpha_r, ur, er = _fold_max_sum(key_r, kr_l, mr_l, ku)
    # p_ref = 0 entries contribute 0 (not 0·(−inf − z)); absent entries have er = 0 too.
    diff = tl.where(er > 0.0, ur - u, 0.0)
    sr_l = sr_l * alpha_r + tl.sum(er, axis=1)
    a_l = a_l * alpha_r + tl.sum(er * diff, axis=1)
    return k_l, m_l, s_l, kr_l, mr_l, sr_l, a_l


@triton.jit
def _combine(k_l, s_l, kz, ku, HAS_SOFTCAP: tl.constexpr):
    """From per-lane-row ``(max key, Σ 2^{u − m})``: the row's base-2 max (0 when −inf), its
    natural max logit (exactly as ``transform`` computes it; 0 when −inf), Σ 2^{u − max}
    and the lane weights."""
    k_max = tl.max(k_l, axis=0)
    m_u = key_log2(k_max, ku)
    m_u = tl.where(m_u == -float("inf"), 0.0, m_u)
    w = exp2_ftz(key_log2(k_l, ku) - m_u)
    m = key_logit(k_max, kz, HAS_SOFTCAP)
    return m_u, tl.where(m == -float("inf"), 0.0, m), tl.sum(s_l * w, axis=0), w


@triton.jit
def token_kl_forward_kernel(
    x_ptr, stride_xb, stride_xt, stride_xv,
    r_ptr, stride_rb, stride_rt, stride_rv,
    y_ptr, stride_yb, stride_yt,
    kl_ptr, logp_ptr, lse_ptr, lse_r_ptr,
    T, V, ignore_index,
    scale, inv_temp, softcap,
    SHIFT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WANT_LOGP: tl.constexpr,
    BLOCK_V: tl.constexpr,
    LANE: tl.constexpr,
    ALIGN: tl.constexpr,
    SAME_ROWS: tl.constexpr,
    FLIP: tl.constexpr,
):
    row, b, t, out, has_label, y = row_target(y_ptr, stride_yb, stride_yt, T, ignore_index, SHIFT)
    if y != ignore_index:
        off_x = b * stride_xb + t * stride_xt
        off_r = b * stride_rb + t * stride_rt
        x_row = x_ptr + off_x
        r_row = r_ptr + off_r
        body_off, head, n_full, tail_start, n_edge = row_split(off_x, V, ALIGN, BLOCK_V)
        x_body = x_ptr + body_off
        if SAME_ROWS:
            r_body = r_ptr + body_off
        else:
            r_body = r_row + head.to(tl.int64) * stride_rv
        k = lane_offsets(BLOCK_V, LANE)
        kz, ku = key_scales(scale, inv_temp, HAS_SOFTCAP, FLIP)
        k_l = tl.full([BLOCK_V // LANE], -float("inf"), tl.float32)
        kr_l = tl.full([BLOCK_V // LANE], -float("inf"), tl.float32)
        m_l = tl.full([BLOCK_V // LANE], -float("inf"), tl.float32)
        mr_l = tl.full([BLOCK_V // LANE], -float("inf"), tl.float32)
        s_l = tl.zeros([BLOCK_V // LANE], tl.float32)
        sr_l = tl.zeros([BLOCK_V // LANE], tl.float32)
        a_l = tl.zeros([BLOCK_V // LANE], tl.float32)
        for i in range(0, n_full):
            j = vocab_offset(i * BLOCK_V + k, ALIGN)
            key = logit_key(tl.load(x_body + j * stride_xv), scale, inv_temp, softcap, HAS_SOFTCAP, FLIP)
            key_r = logit_key(tl.load(r_body + j * stride_rv), scale, inv_temp, softcap, HAS_SOFTCAP,
                              FLIP)
            k_l, m_l, s_l, kr_l, mr_l, sr_l, a_l = _fold_block(key, key_r, k_l, m_l, s_l, kr_l, mr_l,
                                                               sr_l, a_l, ku)
        for e0 in range(0, n_edge, BLOCK_V):
            inside = e0 + k < n_edge
            idx64 = edge_index(e0 + k, head, tail_start).to(tl.int64)  # strided vocab: > 2³¹
            key = logit_key(tl.load(x_row + idx64 * stride_xv, mask=inside, other=0.0),
                            scale, inv_temp, softcap, HAS_SOFTCAP, FLIP)
            key_r = logit_key(tl.load(r_row + idx64 * stride_rv, mask=inside, other=0.0),
                              scale, inv_temp, softcap, HAS_SOFTCAP, FLIP)
            key = tl.where(inside, key, -float("inf"))
            key_r = tl.where(inside, key_r, -float("inf"))
            k_l, m_l, s_l, kr_l, mr_l, sr_l, a_l = _fold_block(key, key_r, k_l, m_l, s_l, kr_l, mr_l,
                                                               sr_l, a_l, ku)
        m_u, m, s, _ = _combine(k_l, s_l, kz, ku, HAS_SOFTCAP)
        mr_u, mr, sr, w_r = _combine(kr_l, sr_l, kz, ku, HAS_SOFTCAP)
        a = tl.sum(a_l * w_r, axis=0)
        lse = m + tl.log(s)
        lse_r = mr + tl.log(sr)
        # In base 2 like the sums: identical rows give exactly 0.
        kl = (a / sr + (m_u - mr_u)) * LN2 + tl.log(s / sr)
        tl.store(kl_ptr + out, kl)
        tl.store(lse_ptr + row, lse)
        tl.store(lse_r_ptr + row, lse_r)
        if WANT_LOGP:
            z_y = transform(tl.load(x_row + y * stride_xv), scale, inv_temp, softcap, HAS_SOFTCAP)
            tl.store(logp_ptr + out, z_y - lse)
    else:
        tl.store(lse_ptr + row, 0.0)
        tl.store(lse_r_ptr + row, 0.0)
        if has_label:
            tl.store(kl_ptr + out, 0.0)
            if WANT_LOGP:
                tl.store(logp_ptr + out, 0.0)
