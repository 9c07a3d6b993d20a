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
"""
import triton
import triton.language as tl

from .tl_utils import row_target, transform


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
):
    row, b, t, out, has_label, y = row_target(y_ptr, stride_yb, stride_yt, T, ignore_index, SHIFT)
    if y != ignore_index:
        x_row = x_ptr + b * stride_xb + t * stride_xt
        r_row = r_ptr + b * stride_rb + t * stride_rt
        cols = tl.arange(0, BLOCK_V)
        m = -float("inf")
        s = 0.0
        mr = -float("inf")
        sr = 0.0
        a = 0.0
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            inside = idx < V
            idx64 = idx.to(tl.int64)  # a strided vocab axis can pass 2^31 elements
            z_in = transform(tl.load(x_row + idx64 * stride_xv, mask=inside, other=0.0),
                             scale, inv_temp, softcap, HAS_SOFTCAP)
            zr_in = transform(tl.load(r_row + idx64 * stride_rv, mask=inside, other=0.0),
                              scale, inv_temp, softcap, HAS_SOFTCAP)
            z = tl.where(inside, z_in, -float("inf"))
            zr = tl.where(inside, zr_in, -float("inf"))
            # Policy: running max/sum-exp.  A max still at −inf is replaced by 0 in the
            # exponents so that e^{−inf − (−inf)} never appears.
            m_new = tl.maximum(m, tl.max(z, axis=0))
            m_use = tl.where(m_new == -float("inf"), 0.0, m_new)
            s = s * tl.exp(m - m_use) + tl.sum(tl.exp(z - m_use), axis=0)
            m = m_new
            # Reference: the same, plus the p_ref-weighted sum of (zr − z).
            mr_new = tl.maximum(mr, tl.max(zr, axis=0))
            mr_use = tl.where(mr_new == -float("inf"), 0.0, mr_new)
            alpha_r = tl.exp(mr - mr_use)
            er = tl.exp(zr - mr_use)
            # (zr_in − z_in is finite past the row's end, where er = 0 anyway.)
            diff = tl.where(er > 0.0, zr_in - z_in, 0.0)
            sr = sr * alpha_r + tl.sum(er, axis=0)
            a = a * alpha_r + tl.sum(er * diff, axis=0)
            mr = mr_new
        m_fin = tl.where(m == -float("inf"), 0.0, m)
        mr_fin = tl.where(mr == -float("inf"), 0.0, mr)
        lse = m_fin + tl.log(s)
        lse_r = mr_fin + tl.log(sr)
        kl = a / sr + (m_fin - mr_fin) + tl.log(s / sr)
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
