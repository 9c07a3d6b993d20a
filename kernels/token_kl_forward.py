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
    a  ← (a + sr·((mr_old − mr) − (m_old − m)))·e^{mr_old − mr}
         + Σ e^{zr − mr}·((zr − mr) − (z − m))

(each logit relative to its own row's max) and, since zr − z = ((zr − mr) − (z − m)) + (mr − m)
and lse − lse_r = (m − mr) + log(s/sr), the maxima cancel exactly:

    KL = a/sr + log(s/sr).

Nothing of the size of the offsets is subtracted: not the two LSEs (~log V plus any offset),
nor zr − z, which at a reference offset of 1e5 from the policy's rounded each term to 4e-3.

Entries with p_ref = 0 (zr = −inf, e.g. a padded vocabulary) contribute 0, not
0·(−inf − z) = NaN; a finite-p_ref entry where z = −inf gives KL = +inf, its true value.

Layout (``kernels/row_split.py``): unmasked 16-byte-aligned body, masked edge, per-lane
running maxima and sums over ``[BLOCK_V // LANE, LANE]`` blocks combined once after the
loop.  Maxima are taken on logit keys (±x without a softcap) and the exponentials in base 2
from key differences, e^{z − m} = 2^{(key − k_max)·ku} (log2 e folded into ``ku``) with
flush-to-zero exp2 (``kernels/fast_math.py``); ``a`` sums ``key_r − key`` and returns to
logits once per row (× kz), so no term is rounded to the ulp of a large common offset.
The LSEs are stored as the pairs ``(hi, lo)`` of ``kernels/lse_pair.py`` and log p(label)
is ``(z_y − m) − log s``.  A reference probability below 2⁻¹²⁶ of the running
maximum's counts as 0 (with ``tl.exp`` the threshold was 2⁻¹⁴⁹), which matters only for
the ``z = −inf`` case above.
"""
import triton
import triton.language as tl

from .fast_math import exp2_ftz, key_scales, logit_key, max_logit
from .lse_pair import lse_pair
from .row_split import edge_index, lane_offsets, row_split, vocab_offset
from .tl_utils import row_target


# Running maxima start at this finite floor, not −inf: every difference to a running max is then
# finite or −inf (never inf − inf), so the fold needs no −inf guards on them.  A lane row still at
# the floor after the loop saw no finite key (−inf is restored before the combine); keys at or
# below it (|logit| ≥ 2¹²⁶ ≈ 8.5e37) count as −inf.
FLOOR = tl.constexpr(-8.507059173023462e37)  # −2¹²⁶


@triton.jit
def _fold_max_sum(key, k_l, ku):
    """New per-lane-row max key of a ``[R, LANE]`` block of logit keys (old: ``k_l``, ≥ FLOOR),
    the factor that rescales the old sums to it, the key differences ``d = key − k_max`` and
    ``e = e^{z − m} = 2^{d·ku}``.  ``d`` is exact wherever the term counts (Sterbenz); rounding
    ``u = key·ku`` first would cost half an ulp of |u| per term at a large common offset."""
    k_new = tl.maximum(k_l, tl.max(key, axis=1))
    d = key - k_new[:, None]
    return k_new, exp2_ftz((k_l - k_new) * ku), d, exp2_ftz(d * ku)


@triton.jit
def _max_shift(k_old, k_new):
    """``k_old − k_new`` for re-basing sums kept relative to a running max key, 0 where the old
    max is −inf (nothing was seen: its sums are 0, or +inf terms that stay +inf)."""
    k_ref = tl.where(k_new == -float("inf"), 0.0, k_new)
    return tl.where(k_old == -float("inf"), 0.0, k_old - k_ref)


@triton.jit
def _fold_block(key, key_r, k_l, s_l, kr_l, sr_l, a_l, ku):
    """Folds a block of policy and reference logit keys (−inf where absent).

    ``a_l = Σ e^{zr − mr}·((key_r − kr_l) − (key − k_l))``: each logit relative to its own row's
    running max, so a reference and a policy at different offsets (|kr − k| ≫ 1) never subtract
    two large keys (``key_r − key`` rounded to the ulp of that gap: 1e-2 at 1e5).  As the maxima
    move, every old term shifts by ``(kr_old − kr_new) − (k_old − k_new)`` (finite: the maxima
    start at FLOOR; a sum that is 0 stays 0, one that is +inf stays +inf)."""
    k_new, alpha, d, e = _fold_max_sum(key, k_l, ku)
    s_l = s_l * alpha + tl.sum(e, axis=1)
    kr_new, alpha_r, d_r, er = _fold_max_sum(key_r, kr_l, ku)
    # p_ref = 0 entries contribute 0 (not 0·(−inf − z)); absent entries have er = 0 too.
    diff = tl.where(er > 0.0, d_r - d, 0.0)
    a_l = (a_l + sr_l * ((kr_l - kr_new) - (k_l - k_new))) * alpha_r + tl.sum(er * diff, axis=1)
    sr_l = sr_l * alpha_r + tl.sum(er, axis=1)
    return k_new, s_l, kr_new, sr_l, a_l


@triton.jit
def _combine(k_l, s_l, kz, ku, HAS_SOFTCAP: tl.constexpr):
    """From per-lane-row ``(max key, Σ e^{z − m})``: the row's max key (0 when −inf), its
    max logit and that one's rounding error (``fast_math.max_logit``), Σ e^{z − max} and
    the lane weights."""
    k_max = tl.max(k_l, axis=0)
    k_ref = tl.where(k_max == -float("inf"), 0.0, k_max)
    w = exp2_ftz((k_l - k_ref) * ku)
    m, m_err = max_logit(k_max, kz, HAS_SOFTCAP)
    return k_ref, m, m_err, tl.sum(s_l * w, axis=0), w


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
        k_l = tl.full([BLOCK_V // LANE], FLOOR, tl.float32)
        kr_l = tl.full([BLOCK_V // LANE], FLOOR, tl.float32)
        s_l = tl.zeros([BLOCK_V // LANE], tl.float32)
        sr_l = tl.zeros([BLOCK_V // LANE], tl.float32)
        a_l = tl.zeros([BLOCK_V // LANE], tl.float32)
        for i in range(0, n_full):
            j = vocab_offset(i * BLOCK_V + k, ALIGN)
            key = logit_key(tl.load(x_body + j * stride_xv), scale, inv_temp, softcap, HAS_SOFTCAP, FLIP)
            key_r = logit_key(tl.load(r_body + j * stride_rv), scale, inv_temp, softcap, HAS_SOFTCAP,
                              FLIP)
            k_l, s_l, kr_l, sr_l, a_l = _fold_block(key, key_r, k_l, s_l, kr_l, sr_l, a_l, ku)
        for e0 in range(0, n_edge, BLOCK_V):
            inside = e0 + k < n_edge
            idx64 = edge_index(e0 + k, head, tail_start).to(tl.int64)  # strided vocab: > 2³¹
            key = logit_key(tl.load(x_row + idx64 * stride_xv, mask=inside, other=0.0),
                            scale, inv_temp, softcap, HAS_SOFTCAP, FLIP)
            key_r = logit_key(tl.load(r_row + idx64 * stride_rv, mask=inside, other=0.0),
                              scale, inv_temp, softcap, HAS_SOFTCAP, FLIP)
            key = tl.where(inside, key, -float("inf"))
            key_r = tl.where(inside, key_r, -float("inf"))
            k_l, s_l, kr_l, sr_l, a_l = _fold_block(key, key_r, k_l, s_l, kr_l, sr_l, a_l, ku)
        k_l = tl.where(k_l == FLOOR, -float("inf"), k_l)  # no finite key seen
        kr_l = tl.where(kr_l == FLOOR, -float("inf"), kr_l)
        k_m, m, m_err, s, _ = _combine(k_l, s_l, kz, ku, HAS_SOFTCAP)
        kr_m, mr, mr_err, sr, w_r = _combine(kr_l, sr_l, kz, ku, HAS_SOFTCAP)
        # Lane rows re-based on the row maxima (as in _fold_block); then, with a relative to both
        # maxima, KL = a/sr·kz + log(s/sr): the maxima cancel exactly, identical rows give 0.
        k_top = tl.max(k_l, axis=0)
        kr_top = tl.max(kr_l, axis=0)
        a = tl.sum((a_l + sr_l * (_max_shift(kr_l, kr_top) - _max_shift(k_l, k_top))) * w_r, axis=0)
        log_s = tl.log(s)
        kl = (a / sr) * kz + tl.log(s / sr)
        tl.store(kl_ptr + out, kl)
        hi, lo = lse_pair(m, log_s, m_err)  # kernels/lse_pair.py
        tl.store(lse_ptr + 2 * row, hi)
        tl.store(lse_ptr + 2 * row + 1, lo)
        hi_r, lo_r = lse_pair(mr, tl.log(sr), mr_err)
        tl.store(lse_r_ptr + 2 * row, hi_r)
        tl.store(lse_r_ptr + 2 * row + 1, lo_r)
        if WANT_LOGP:
            key_y = logit_key(tl.load(x_row + y * stride_xv), scale, inv_temp, softcap, HAS_SOFTCAP, FLIP)
            tl.store(logp_ptr + out, (key_y - k_m) * kz - log_s)  # key difference: exact near the max
    else:
        tl.store(lse_ptr + 2 * row, 0.0)
        tl.store(lse_ptr + 2 * row + 1, 0.0)
        tl.store(lse_r_ptr + 2 * row, 0.0)
        tl.store(lse_r_ptr + 2 * row + 1, 0.0)
        if has_label:
            tl.store(kl_ptr + out, 0.0)
            if WANT_LOGP:
                tl.store(logp_ptr + out, 0.0)
