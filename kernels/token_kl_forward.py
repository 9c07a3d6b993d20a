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
loop.  The loop works in base 2 (``u = z·log2 e``, log2 e folded into the scale) with
flush-to-zero ``2^{u − m_u}`` (``kernels/fast_math.py``); sums, maxima and ``a`` return to
base e once per row (× ln 2).  A reference probability below 2⁻¹²⁶ of the running
maximum's counts as 0 (with ``tl.exp`` the threshold was 2⁻¹⁴⁹), which matters only for
the ``z = −inf`` case above.
"""
import triton
import triton.language as tl

from .fast_math import LN2, exp2_ftz, transform_log2
from .row_split import edge_index, lane_offsets, row_split, vocab_offset
from .tl_utils import row_target


@triton.jit
def _fold_max_sum(u, m_l):
    """New per-lane-row max of ``[R, LANE]`` base-2 logits ``u``, the factor that rescales
    the old sums to it and ``e = 2^{u − m}`` (−inf maxima exponentiate against 0)."""
    m_new = tl.maximum(m_l, tl.max(u, axis=1))
    m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
    return m_new, exp2_ftz(m_l - m_ref), exp2_ftz(u - m_ref[:, None])


@triton.jit
def _fold_block(z, zr, m_l, s_l, mr_l, sr_l, a_l):
    """Folds a block of policy ``z`` and reference ``zr`` base-2 logits (−inf where absent)."""
    m_l, alpha, e = _fold_max_sum(z, m_l)
    s_l = s_l * alpha + tl.sum(e, axis=1)
    mr_l, alpha_r, er = _fold_max_sum(zr, mr_l)
    # p_ref = 0 entries contribute 0 (not 0·(−inf − z)); absent entries have er = 0 too.
    diff = tl.where(er > 0.0, zr - z, 0.0)
    sr_l = sr_l * alpha_r + tl.sum(er, axis=1)
    a_l = a_l * alpha_r + tl.sum(er * diff, axis=1)
    return m_l, s_l, mr_l, sr_l, a_l


@triton.jit
def _combine(m_l, s_l):
    """Row max (0 when −inf) and Σ 2^{u − max} from per-lane-row ``(m_l, s_l)``, and the
    lane weights."""
    m = tl.max(m_l, axis=0)
    m_fin = tl.where(m == -float("inf"), 0.0, m)
    w = exp2_ftz(m_l - m_fin)
    return m_fin, tl.sum(s_l * w, axis=0), w


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
        m_l = tl.full([BLOCK_V // LANE], -float("inf"), tl.float32)
        mr_l = tl.full([BLOCK_V // LANE], -float("inf"), tl.float32)
        s_l = tl.zeros([BLOCK_V // LANE], tl.float32)
        sr_l = tl.zeros([BLOCK_V // LANE], tl.float32)
        a_l = tl.zeros([BLOCK_V // LANE], tl.float32)
        for i in range(0, n_full):
            j = vocab_offset(i * BLOCK_V + k, ALIGN)
            z = transform_log2(tl.load(x_body + j * stride_xv), scale, inv_temp, softcap, HAS_SOFTCAP)
            zr = transform_log2(tl.load(r_body + j * stride_rv), scale, inv_temp, softcap, HAS_SOFTCAP)
            m_l, s_l, mr_l, sr_l, a_l = _fold_block(z, zr, m_l, s_l, mr_l, sr_l, a_l)
        for e0 in range(0, n_edge, BLOCK_V):
            inside = e0 + k < n_edge
            idx64 = edge_index(e0 + k, head, tail_start).to(tl.int64)  # strided vocab: > 2³¹
            z = transform_log2(tl.load(x_row + idx64 * stride_xv, mask=inside, other=0.0),
                               scale, inv_temp, softcap, HAS_SOFTCAP)
            zr = transform_log2(tl.load(r_row + idx64 * stride_rv, mask=inside, other=0.0),
                                scale, inv_temp, softcap, HAS_SOFTCAP)
            z = tl.where(inside, z, -float("inf"))
            zr = tl.where(inside, zr, -float("inf"))
            m_l, s_l, mr_l, sr_l, a_l = _fold_block(z, zr, m_l, s_l, mr_l, sr_l, a_l)
        m_fin, s, _ = _combine(m_l, s_l)
        mr_fin, sr, w_r = _combine(mr_l, sr_l)
        a = tl.sum(a_l * w_r, axis=0)
        lse_u = m_fin + tl.log2(s)
        lse = lse_u * LN2
        lse_r = (mr_fin + tl.log2(sr)) * LN2
        kl = (a / sr + (m_fin - mr_fin)) * LN2 + tl.log(s / sr)
        tl.store(kl_ptr + out, kl)
        tl.store(lse_ptr + row, lse)
        tl.store(lse_r_ptr + row, lse_r)
        if WANT_LOGP:
            u_y = transform_log2(tl.load(x_row + y * stride_xv), scale, inv_temp, softcap, HAS_SOFTCAP)
            tl.store(logp_ptr + out, (u_y - lse_u) * LN2)
    else:
        tl.store(lse_ptr + row, 0.0)
        tl.store(lse_r_ptr + row, 0.0)
        if has_label:
            tl.store(kl_ptr + out, 0.0)
            if WANT_LOGP:
                tl.store(logp_ptr + out, 0.0)
