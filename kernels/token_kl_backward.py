"""Token stage, backward of the full-vocabulary KL(π_ref ‖ π_θ) (and, optionally, logp).

With p = softmax(z) (policy), p_ref = softmax(zr) (reference, a constant) and the
upstream gradients g (of the KL) and g_y (of log p(label), when the forward returned it):

    ∂KL/∂z_v    = p_v − p_ref,v          (from −Σ_u p_ref,u ∂ log p_u / ∂z_v)
    ∂logp/∂z_v  = onehot(y)_v − p_v

so  ∂/∂z_v = g·(p_v − p_ref,v) + g_y·(onehot(y)_v − p_v),  times dz/dx of the logit
transform.  p and p_ref are recomputed block by block from the saved LSE pairs, so
neither distribution is ever stored; e^{−inf − lse} = 0 handles −inf (padded) logits.
One program per policy row; rows without a label get zeros without reading anything.
The output may alias the policy logits (each element is read before it is written).

Layout as the forward (``kernels/row_split.py``): unmasked 16-byte-aligned body, masked
edge; the one-hot term is applied to the label's element after the loop (read before
it, rewritten after a block barrier), as in ``token_backward.py``.
"""
import triton
import triton.language as tl

from .fast_math import LOG2E
from .row_split import edge_index, lane_offsets, row_split, vocab_offset, zero_row
from .tl_utils import logit_minus, row_target, transform_grad


@triton.jit
def _grad_x(x, r, hi, lo2, hi_r, lo2_r, g, g_kl_net, scale, inv_temp, softcap,
            HAS_SOFTCAP: tl.constexpr, HAS_G_KL: tl.constexpr):
    """∂/∂x without the label's one-hot term: ``(g − g_y)·p − g·p_ref`` times dz/dx.

    ``(hi, lo)``, ``(hi_r, lo_r)``: the LSE pairs (``kernels/lse_pair.py``), ``lo2 = lo·log2 e``:
    p = 2^{(z − hi)·log2 e − lo2}, exact near the max, one FFMA as with a one-value LSE.
    ``g_kl_net = g − g_y`` and ``g`` arrive multiplied by scale/T when there is no
    softcap (dz/dx is that constant then)."""
    p = tl.exp2(logit_minus(x, hi, scale, inv_temp, softcap, HAS_SOFTCAP) * LOG2E - lo2)
    d = g_kl_net * p
    if HAS_G_KL:
        d -= g * tl.exp2(logit_minus(r, hi_r, scale, inv_temp, softcap, HAS_SOFTCAP) * LOG2E - lo2_r)
    if HAS_SOFTCAP:
        d = d * transform_grad(x, scale, inv_temp, softcap, HAS_SOFTCAP)
    return d


@triton.jit
def token_kl_backward_kernel(
    x_ptr, stride_xb, stride_xt, stride_xv,
    r_ptr, stride_rb, stride_rt, stride_rv,
    dx_ptr, stride_db, stride_dt, stride_dv,
    y_ptr, stride_yb, stride_yt,
    lse_ptr, lse_r_ptr, g_kl_ptr, g_logp_ptr,
    T, V, ignore_index,
    scale, inv_temp, softcap,
    SHIFT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_G_KL: tl.constexpr,
    HAS_G_LOGP: tl.constexpr,
    BLOCK_V: tl.constexpr,
    LANE: tl.constexpr,
    ALIGN: tl.constexpr,
    SAME_ROWS: tl.constexpr,
):
    row, b, t, out, has_label, y = row_target(y_ptr, stride_yb, stride_yt, T, ignore_index, SHIFT)
    off_x = b * stride_xb + t * stride_xt
    off_r = b * stride_rb + t * stride_rt
    off_d = b * stride_db + t * stride_dt
    k = lane_offsets(BLOCK_V, LANE)
    out_ty = dx_ptr.dtype.element_ty
    if y != ignore_index:
        body_off, head, n_full, tail_start, n_edge = row_split(off_x, V, ALIGN, BLOCK_V)
        x_row = x_ptr + off_x
        r_row = r_ptr + off_r
        dx_row = dx_ptr + off_d
        if SAME_ROWS:
            r_body = r_ptr + body_off
            dx_body = dx_ptr + body_off
        else:
            r_body = r_row + head.to(tl.int64) * stride_rv
            dx_body = dx_row + head.to(tl.int64) * stride_dv
        x_body = x_ptr + body_off
        hi = tl.load(lse_ptr + 2 * row)
        lo2 = tl.load(lse_ptr + 2 * row + 1) * LOG2E
        hi_r = tl.load(lse_r_ptr + 2 * row)
        lo2_r = tl.load(lse_r_ptr + 2 * row + 1) * LOG2E
        gs = 1.0
        if not HAS_SOFTCAP:
            gs = scale * inv_temp  # the constant dz/dx, folded into the coefficients
        g = 0.0
        if HAS_G_KL:
            g = tl.load(g_kl_ptr + out) * gs
        g_y = 0.0
        if HAS_G_LOGP:
            g_y = tl.load(g_logp_ptr + out) * gs
        g_net = g - g_y
        # The label's logit, read before any store can overwrite it (in-place backward).
        x_y = 0.0
        r_y = 0.0
        if HAS_G_LOGP:
            x_y = tl.load(x_row + y * stride_xv)
            if HAS_G_KL:
                r_y = tl.load(r_row + y * stride_rv)
        for i in range(0, n_full):
            j = vocab_offset(i * BLOCK_V + k, ALIGN)
            x = tl.load(x_body + j * stride_xv)
            r = 0.0
            if HAS_G_KL:
                r = tl.load(r_body + j * stride_rv)
            dx = _grad_x(x, r, hi, lo2, hi_r, lo2_r, g, g_net, scale, inv_temp, softcap, HAS_SOFTCAP, HAS_G_KL)
            tl.store(dx_body + j * stride_dv, dx.to(out_ty))
        for e0 in range(0, n_edge, BLOCK_V):
            inside = e0 + k < n_edge
            idx64 = edge_index(e0 + k, head, tail_start).to(tl.int64)  # strided vocab: > 2³¹
            x = tl.load(x_row + idx64 * stride_xv, mask=inside, other=0.0)
            r = 0.0
            if HAS_G_KL:
                r = tl.load(r_row + idx64 * stride_rv, mask=inside, other=0.0)
            dx = _grad_x(x, r, hi, lo2, hi_r, lo2_r, g, g_net, scale, inv_temp, softcap, HAS_SOFTCAP, HAS_G_KL)
            tl.store(dx_row + idx64 * stride_dv, dx.to(out_ty), mask=inside)
        if HAS_G_LOGP:
            # The label: ∂/∂z_y gains +g_y (the one-hot term of log p(y), in fp32).
            d_y = _grad_x(x_y, r_y, hi, lo2, hi_r, lo2_r, g, g_net, scale, inv_temp, softcap, HAS_SOFTCAP,
                          HAS_G_KL)
            if HAS_SOFTCAP:
                d_y += g_y * transform_grad(x_y, scale, inv_temp, softcap, HAS_SOFTCAP)
            else:
                d_y += g_y
            tl.debug_barrier()  # every thread's loop store of element y is done
            tl.store(dx_row + y * stride_dv, d_y.to(out_ty))
    else:
        zero_row(dx_ptr, off_d, V, stride_dv, ALIGN, BLOCK_V, LANE)
