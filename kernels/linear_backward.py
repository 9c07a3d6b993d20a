"""Fused-linear backward: recompute each logits tile, form its gradient on-chip, feed dH and dW.

A 1-D grid of ``token blocks × vocabulary tiles`` programs in grouped order
(:func:`grouped_program`: programs that run together share hidden/dH rows in L2 and few
of them reduce into the same dW tile).  A program rebuilds its ``[BLOCK_M, BLOCK_V]``
tile ``x = H[rows]·Wᵀ (+ b)`` (``tl.dot`` over ``D``, fp32), then with
``log p = (z − hi) − lo`` (the LSE pair of ``kernels/lse_pair.py``: exact at any offset)

    G = dz/dx · ( g·(onehot(y) − p)  −  g_H·p·(log p + H)
                  + 2·g_Q·p·(p / Σp² − 1)  +  g_M / V )

(each extra's term only under its constexpr flag; out-of-range rows and columns are 0)
and accumulates, with fp32 atomics,

    dH[rows] += G·W[tile]      dW[tile] += Gᵀ·H[rows]      db[tile] += Σ_rows G

looping over ``D`` in ``BLOCK_D`` slices.  ``G`` is rounded to the input dtype before
the two GEMMs (tensor-core operands), as the logits path stores its gradient.  Atomics
make the result independent of the launch order up to fp32 rounding, not bitwise.  They
are ``relaxed``: nothing reads an accumulator before the kernel ends, so no ordering is
needed and each compiles to a fire-and-forget ``REDG`` without GPU-scope fences.

Gradient filtering (``FILTER``, opt-in): with ``s_m = |g| + |g_H| + |g_Q|`` (the row's
upstream gradient scale), a tile whose every ``|dz| < filter_eps · s_m`` skips its dH and
dW dots (rows with ``s_m = 0`` have ``dz = 0`` and never keep a tile).  For log-probs
alone that is ``|onehot − p| < filter_eps`` over the whole tile: the threshold reads as a
probability whatever the loss's reduction scales ``g`` by.  ``db`` is never filtered.  A
NaN in ``dz`` keeps its tile (the test is ``not (|dz| < bound)``).  With ``PERMUTED`` the
vocabulary tiles hold the ids ``perm[pid_v·BLOCK_V : …]`` instead of consecutive ids (the
launcher orders them by mean logit so that the likely ids share tiles and the rest can be
skipped); W rows, bias, targets, dW and db are addressed by the real ids.
"""
import triton
import triton.language as tl

from .linear_tile import grouped_program, logits_tile
from .tl_utils import logit_minus, transform_grad


@triton.jit
def linear_backward_kernel(
    h_ptr, stride_hn, stride_hd,
    w_ptr, stride_wv, stride_wd,
    b_ptr, rows_ptr, y_ptr, perm_ptr,
    lse_ptr, g_ptr, ent_ptr, g_ent_ptr, lsq_ptr, g_lsq_ptr, g_mean_ptr,
    dh_ptr, stride_dhn, stride_dhd,
    dw_ptr, stride_dwv, stride_dwd,
    db_ptr,
    M, V, D,
    scale, inv_temp, softcap, filter_eps,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    FILTER: tl.constexpr,
    PERMUTED: tl.constexpr,
    HAS_G: tl.constexpr,
    GRAD_ENTROPY: tl.constexpr,
    GRAD_LSQ: tl.constexpr,
    GRAD_MEAN: tl.constexpr,
    NEED_DH: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_v = grouped_program(tl.cdiv(M, BLOCK_M), tl.cdiv(V, BLOCK_V), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    in_m = offs_m < M
    in_v = offs_v < V
    if PERMUTED:  # from here on offs_v holds vocabulary ids; in_v still marks the tile's valid slots
        offs_v = tl.load(perm_ptr + offs_v, mask=in_v, other=0).to(tl.int64)
    rows = tl.load(rows_ptr + offs_m, mask=in_m, other=0).to(tl.int64)
    y = tl.load(y_ptr + offs_m, mask=in_m, other=-1).to(tl.int64)

    acc = logits_tile(h_ptr, stride_hn, stride_hd, w_ptr, stride_wv, stride_wd, b_ptr,
                      rows, in_m, offs_v, in_v, D, HAS_BIAS, DOT_FP32, INPUT_PRECISION,
                      BLOCK_M, BLOCK_V, BLOCK_D)
    hi = tl.load(lse_ptr + 2 * offs_m, mask=in_m, other=0.0)
    lo = tl.load(lse_ptr + 2 * offs_m + 1, mask=in_m, other=0.0)
    # z − hi rounded once (one FMA of the exact x·scale/T without a softcap; lo holds the max
    # logit's rounding error): exact near the max at any scale and temperature.
    log_p = logit_minus(acc, hi[:, None], scale, inv_temp, softcap, HAS_SOFTCAP) - lo[:, None]
    p = tl.exp(log_p)
    dz = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    g_scale = tl.zeros([BLOCK_M], dtype=tl.float32)  # s_m of the filter
    if HAS_G:
        g = tl.load(g_ptr + offs_m, mask=in_m, other=0.0)
        dz += tl.where(offs_v[None, :] == y[:, None], g[:, None], 0.0) - g[:, None] * p
        g_scale += tl.abs(g)
    if GRAD_ENTROPY:
        g_h = tl.load(g_ent_ptr + offs_m, mask=in_m, other=0.0)
        ent = tl.load(ent_ptr + offs_m, mask=in_m, other=0.0)
        # p·(log p + H) is 0·(−inf) at −inf logits (a −inf bias masking ids): those get 0.
        dz -= g_h[:, None] * p * (tl.where(p > 0.0, log_p, 0.0) + ent[:, None])
        g_scale += tl.abs(g_h)
    if GRAD_LSQ:
        g_q = tl.load(g_lsq_ptr + offs_m, mask=in_m, other=0.0)
        inv_sum_p2 = tl.exp(-tl.load(lsq_ptr + offs_m, mask=in_m, other=0.0))
        dz += 2.0 * g_q[:, None] * p * (p * inv_sum_p2[:, None] - 1.0)
        g_scale += tl.abs(g_q)
    if GRAD_MEAN:
        g_m = tl.load(g_mean_ptr + offs_m, mask=in_m, other=0.0) / V
        dz += g_m[:, None]
    d_end = D
    if FILTER:
        bound = tl.where(g_scale > 0.0, filter_eps * g_scale, float("inf"))
        above = in_v[None, :] & (~(tl.abs(dz) < bound[:, None]))
        # A filtered tile runs no D steps: its dH/dW dots are skipped.
        d_end = tl.where(tl.max(above.to(tl.int32)) > 0, D, 0)
    G = dz * transform_grad(acc, scale, inv_temp, softcap, HAS_SOFTCAP)
    G = tl.where(in_m[:, None] & in_v[None, :], G, 0.0)
    if NEED_DB:
        tl.atomic_add(db_ptr + offs_v, tl.sum(G, axis=0), mask=in_v, sem="relaxed")
    if DOT_FP32:
        # Round like the compiled path does, then compute the dots in fp32.
        G = G.to(h_ptr.dtype.element_ty).to(tl.float32)
    else:
        G = G.to(h_ptr.dtype.element_ty)
    for d0 in range(0, d_end, BLOCK_D):
        dd = d0 + offs_d
        in_d = dd < D
        if NEED_DH:
            w = tl.load(w_ptr + offs_v[:, None] * stride_wv + dd[None, :] * stride_wd,
                        mask=in_v[:, None] & in_d[None, :], other=0.0)
            if DOT_FP32:
                w = w.to(tl.float32)
            dh = tl.dot(G, w, input_precision=INPUT_PRECISION)
            tl.atomic_add(dh_ptr + rows[:, None] * stride_dhn + dd[None, :] * stride_dhd,
                          dh, mask=in_m[:, None] & in_d[None, :], sem="relaxed")
        if NEED_DW:
            h = tl.load(h_ptr + rows[:, None] * stride_hn + dd[None, :] * stride_hd,
                        mask=in_m[:, None] & in_d[None, :], other=0.0)
            if DOT_FP32:
                h = h.to(tl.float32)
            dw = tl.dot(tl.trans(G), h, input_precision=INPUT_PRECISION)
            tl.atomic_add(dw_ptr + offs_v[:, None] * stride_dwv + dd[None, :] * stride_dwd,
                          dw, mask=in_v[:, None] & in_d[None, :], sem="relaxed")
