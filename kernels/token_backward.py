"""Token stage, backward: gradient of the logits from per-token coefficients.

With p = softmax(z) of the row and g_* the upstream gradients of the forward's outputs:

    ∂/∂z_v  of  logp       = g·(onehot(y)_v − p_v)        (the −1 at y applied in fp32)
    ∂/∂z_v  of  entropy H  = −g_H · p_v·(log p_v + H)
    ∂/∂z_v  of  log Σ p²   = 2·g_Q · p_v·(p_v / Σp² − 1)
    ∂/∂z_v  of  mean_logit = g_M / V

and ∂/∂x_v = ∂/∂z_v · dz/dx (temperature, scale, softcap).  One program per logits
row; rows with no label are written as zeros without reading the logits.  The
output may alias the logits (in-place backward): each element is read before it
is written by the same program.

Layout as the forward (``kernels/row_split.py``): unmasked 16-byte-aligned body, masked
edge.  The one-hot term is not in the loop: the label's element is read before the
loop, and after it (and a block barrier, so that no loop store to the same address
lands later) rewritten with its full gradient.  The LSE arrives as the pair ``(hi, lo)`` of
``kernels/lse_pair.py`` and p = 2^{(z − hi)·log2 e − lo·log2 e}: ``z − hi`` is exact near the
max and the rest is one FFMA, the instruction count of the one-value ``(z − lse)·log2 e``.
``tl.exp2`` keeps subnormal gradients (no flush-to-zero here).
"""
import triton
import triton.language as tl

from .fast_math import LOG2E
from .row_split import edge_index, lane_offsets, row_split, vocab_offset, zero_row
from .tl_utils import logit_minus, row_target, transform_grad


@triton.jit
def _grad_x(x, g, g_h, h, hi, lo, lo2, g_q, inv_sum_p2, g_m, scale, inv_temp, softcap,
            HAS_SOFTCAP: tl.constexpr, GRAD_ENTROPY: tl.constexpr, GRAD_LSQ: tl.constexpr,
            GRAD_MEAN: tl.constexpr):
    """∂/∂x of the row's outputs, without the one-hot term ``g·dz/dx`` of the label.

    ``(hi, lo)`` is the row's LSE pair and ``lo2 = lo·log2 e``.  Without a softcap dz/dx is
    the constant scale/T and every coefficient (``g``, ``g_h``, ``g_q``, ``g_m``) arrives
    already multiplied by it."""
    # (z − hi) first, rounded once: exact near the max (a one-entry row gives p = 1).
    t = logit_minus(x, hi, scale, inv_temp, softcap, HAS_SOFTCAP)
    p = tl.exp2(t * LOG2E - lo2)
    d = p * (-g)
    if GRAD_ENTROPY:
        # p·(log p + H) is 0·(−inf) at −inf logits: those entries get 0.
        d -= g_h * p * (tl.where(p > 0.0, t - lo, 0.0) + h)
    if GRAD_LSQ:
        d += 2.0 * g_q * p * (p * inv_sum_p2 - 1.0)
    if GRAD_MEAN:
        d += g_m
    if HAS_SOFTCAP:
        d = d * transform_grad(x, scale, inv_temp, softcap, HAS_SOFTCAP)
    return d


@triton.jit
def token_backward_kernel(
    x_ptr, stride_xb, stride_xt, stride_xv,
    dx_ptr, stride_db, stride_dt, stride_dv,
    y_ptr, stride_yb, stride_yt,
    lse_ptr, g_ptr, ent_ptr, g_ent_ptr, lsq_ptr, g_lsq_ptr, g_mean_ptr,
    T, V, ignore_index,
    scale, inv_temp, softcap,
    SHIFT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_G: tl.constexpr,
    GRAD_ENTROPY: tl.constexpr,
    GRAD_LSQ: tl.constexpr,
    GRAD_MEAN: tl.constexpr,
    BLOCK_V: tl.constexpr,
    LANE: tl.constexpr,
    ALIGN: tl.constexpr,
    SAME_ROWS: tl.constexpr,
):
    row, b, t, out, has_label, y = row_target(y_ptr, stride_yb, stride_yt, T, ignore_index, SHIFT)
    off_x = b * stride_xb + t * stride_xt
    off_d = b * stride_db + t * stride_dt
    k = lane_offsets(BLOCK_V, LANE)
    out_ty = dx_ptr.dtype.element_ty
    if y != ignore_index:
        body_off, head, n_full, tail_start, n_edge = row_split(off_x, V, ALIGN, BLOCK_V)
        x_row = x_ptr + off_x
        dx_row = dx_ptr + off_d
        if SAME_ROWS:
            dx_body = dx_ptr + body_off
        else:
            dx_body = dx_row + head.to(tl.int64) * stride_dv
        hi = tl.load(lse_ptr + 2 * row)
        lo = tl.load(lse_ptr + 2 * row + 1)
        lo2 = lo * LOG2E
        # Without a softcap the constant dz/dx = scale/T is folded into every coefficient.
        gs = 1.0
        if not HAS_SOFTCAP:
            gs = scale * inv_temp
        g = 0.0
        if HAS_G:
            g = tl.load(g_ptr + out) * gs
        g_h = 0.0
        h = 0.0
        if GRAD_ENTROPY:
            g_h = tl.load(g_ent_ptr + out) * gs
            h = tl.load(ent_ptr + out)
        g_q = 0.0
        inv_sum_p2 = 0.0
        if GRAD_LSQ:
            g_q = tl.load(g_lsq_ptr + out) * gs
            inv_sum_p2 = tl.exp(-tl.load(lsq_ptr + out))
        g_m = 0.0
        if GRAD_MEAN:
            g_m = tl.load(g_mean_ptr + out) / V * gs
        # The label's logit, read before any store can overwrite it (in-place backward).
        y_in = (y >= 0) & (y < V)
        y_safe = tl.where(y_in, y, 0)
        x_y = tl.load(x_row + y_safe * stride_xv, mask=y_in, other=0.0)
        x_body = x_ptr + body_off
        for i in range(0, n_full):
            j = i * BLOCK_V + k
            x = tl.load(x_body + vocab_offset(j, ALIGN) * stride_xv)
            dx = _grad_x(x, g, g_h, h, hi, lo, lo2, g_q, inv_sum_p2, g_m, scale, inv_temp,
                         softcap, HAS_SOFTCAP, GRAD_ENTROPY, GRAD_LSQ, GRAD_MEAN)
            tl.store(dx_body + vocab_offset(j, ALIGN) * stride_dv, dx.to(out_ty))
        for e0 in range(0, n_edge, BLOCK_V):
            inside = e0 + k < n_edge
            idx = edge_index(e0 + k, head, tail_start)
            x = tl.load(x_row + vocab_offset(idx, ALIGN) * stride_xv, mask=inside, other=0.0)
            dx = _grad_x(x, g, g_h, h, hi, lo, lo2, g_q, inv_sum_p2, g_m, scale, inv_temp,
                         softcap, HAS_SOFTCAP, GRAD_ENTROPY, GRAD_LSQ, GRAD_MEAN)
            tl.store(dx_row + vocab_offset(idx, ALIGN) * stride_dv, dx.to(out_ty), mask=inside)
        if HAS_G:
            # The label: ∂/∂z_y gains +g (the one-hot term, in fp32 like the rest).
            d_y = _grad_x(x_y, g, g_h, h, hi, lo, lo2, g_q, inv_sum_p2, g_m, scale, inv_temp,
                          softcap, HAS_SOFTCAP, GRAD_ENTROPY, GRAD_LSQ, GRAD_MEAN)
            if HAS_SOFTCAP:
                d_y += g * transform_grad(x_y, scale, inv_temp, softcap, HAS_SOFTCAP)
            else:
                d_y += g
            tl.debug_barrier()  # every thread's loop store of element y is done
            tl.store(dx_row + y_safe * stride_dv, d_y.to(out_ty), mask=y_in)
    else:
        zero_row(dx_ptr, off_d, V, stride_dv, ALIGN, BLOCK_V, LANE)
