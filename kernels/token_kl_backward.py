"""Token stage, backward of the full-vocabulary KL(π_ref ‖ π_θ) (and, optionally, logp).

With p = softmax(z) (policy), p_ref = softmax(zr) (reference, a constant) and the
upstream gradients g (of the KL) and g_y (of log p(label), when the forward returned it):

    ∂KL/∂z_v    = p_v − p_ref,v          (from −Σ_u p_ref,u ∂ log p_u / ∂z_v)
    ∂logp/∂z_v  = onehot(y)_v − p_v

so  ∂/∂z_v = g·(p_v − p_ref,v) + g_y·(onehot(y)_v − p_v),  times dz/dx of the logit
transform.  p and p_ref are recomputed block by block from the saved lse and lse_r, so
neither distribution is ever stored; e^{−inf − lse} = 0 handles −inf (padded) logits.
One program per policy row; rows without a label get zeros without reading anything.
The output may alias the policy logits (each element is read before it is written).
"""
import triton
import triton.language as tl

from .tl_utils import row_target, transform, transform_grad


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
):
    row, b, t, out, has_label, y = row_target(y_ptr, stride_yb, stride_yt, T, ignore_index, SHIFT)
    dx_row = dx_ptr + b * stride_db + t * stride_dt
    cols = tl.arange(0, BLOCK_V)
    if y != ignore_index:
        x_row = x_ptr + b * stride_xb + t * stride_xt
        r_row = r_ptr + b * stride_rb + t * stride_rt
        lse = tl.load(lse_ptr + row)
        lse_r = tl.load(lse_r_ptr + row)
        g = 0.0
        if HAS_G_KL:
            g = tl.load(g_kl_ptr + out)
        g_y = 0.0
        if HAS_G_LOGP:
            g_y = tl.load(g_logp_ptr + out)
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            inside = idx < V
            idx64 = idx.to(tl.int64)  # a strided vocab axis can pass 2^31 elements
            x = tl.load(x_row + idx64 * stride_xv, mask=inside, other=0.0)
            p = tl.exp(transform(x, scale, inv_temp, softcap, HAS_SOFTCAP) - lse)
            dz = (g - g_y) * p
            if HAS_G_KL:
                zr = transform(tl.load(r_row + idx64 * stride_rv, mask=inside, other=0.0),
                               scale, inv_temp, softcap, HAS_SOFTCAP)
                dz -= g * tl.exp(zr - lse_r)
            if HAS_G_LOGP:
                dz += tl.where(idx == y, g_y, 0.0)
            dx = dz * transform_grad(x, scale, inv_temp, softcap, HAS_SOFTCAP)
            tl.store(dx_row + idx64 * stride_dv, dx.to(dx_ptr.dtype.element_ty), mask=inside)
    else:
        zeros = tl.zeros([BLOCK_V], dtype=dx_ptr.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            tl.store(dx_row + idx.to(tl.int64) * stride_dv, zeros, mask=idx < V)
