"""Token stage, backward: gradient of the logits from per-token coefficients.

With p = softmax(z) of the row and g_* the upstream gradients of the forward's outputs:

    ∂/∂z_v  of  logp       = g·(onehot(y)_v − p_v)        (the −1 at y applied in fp32)
    ∂/∂z_v  of  entropy H  = −g_H · p_v·(z_v − lse + H)
    ∂/∂z_v  of  log Σ p²   = 2·g_Q · p_v·(p_v / Σp² − 1)
    ∂/∂z_v  of  mean_logit = g_M / V

and ∂/∂x_v = ∂/∂z_v · dz/dx (temperature, scale, softcap).  One program per logits
row; rows with no label are written as zeros without reading the logits.  The
output may alias the logits (in-place backward): each element is read before it
is written by the same program.
"""
import triton
import triton.language as tl

from .tl_utils import row_target, transform, transform_grad


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
):
    row, b, t, out, has_label, y = row_target(y_ptr, stride_yb, stride_yt, T, ignore_index, SHIFT)
    dx_row = dx_ptr + b * stride_db + t * stride_dt
    cols = tl.arange(0, BLOCK_V)
    if y != ignore_index:
        x_row = x_ptr + b * stride_xb + t * stride_xt
        lse = tl.load(lse_ptr + row)
        g = 0.0
        if HAS_G:
            g = tl.load(g_ptr + out)
        g_h = 0.0
        h = 0.0
        if GRAD_ENTROPY:
            g_h = tl.load(g_ent_ptr + out)
            h = tl.load(ent_ptr + out)
        g_q = 0.0
        inv_sum_p2 = 0.0
        if GRAD_LSQ:
            g_q = tl.load(g_lsq_ptr + out)
            inv_sum_p2 = tl.exp(-tl.load(lsq_ptr + out))
        g_m = 0.0
        if GRAD_MEAN:
            g_m = tl.load(g_mean_ptr + out) / V
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            inside = idx < V
            x = tl.load(x_row + idx * stride_xv, mask=inside, other=0.0)
            z = transform(x, scale, inv_temp, softcap, HAS_SOFTCAP)
            p = tl.exp(z - lse)
            dz = tl.where(idx == y, g, 0.0) - g * p
            if GRAD_ENTROPY:
                # p·(z − lse + H) is 0·(−inf) at −inf logits: those entries get 0.
                dz -= g_h * p * (tl.where(p > 0.0, z, lse) - lse + h)
            if GRAD_LSQ:
                dz += 2.0 * g_q * p * (p * inv_sum_p2 - 1.0)
            if GRAD_MEAN:
                dz += g_m
            dx = dz * transform_grad(x, scale, inv_temp, softcap, HAS_SOFTCAP)
            tl.store(dx_row + idx * stride_dv, dx.to(dx_ptr.dtype.element_ty), mask=inside)
    else:
        zeros = tl.zeros([BLOCK_V], dtype=dx_ptr.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            tl.store(dx_row + idx * stride_dv, zeros, mask=idx < V)
