"""The token forward's exponent frame: one FFMA per element, the exact sums once per row.

The forward needs ``e_v = 2^{(key_v − k_max)·ku}`` for every element of a row (keys and ``ku`` as in
``kernels/fast_math.py``).  Forming the key difference first costs an FADD and an FMUL per element.
Instead each lane row keeps the *frame* ``mk = fl(k·ku)`` of its running max key ``k`` (one FMUL per
lane row, :func:`lane_frame`) and every element takes

    t_v = fma(key_v, ku, −mk) = (key_v − k)·ku + r,        r = k·ku − mk   (one rounding, of t_v)

because the FMA forms ``key_v·ku`` exactly.  ``r`` (the rounding error of ``mk``, below half an ulp
of it) is the same for every element of the frame, so the sums carry one common factor:

    s_c = Σ 2^{t_v} = 2^r·s,    a_c = Σ 2^{t_v}·t_v = 2^r·(a + r·s),    q_c = Σ 2^{2 t_v} = 2^{2r}·q

with ``s, a, q`` the exact-frame sums (``Σ e``, ``Σ e·(key − k_max)·ku``, ``Σ e²``).  Frames move
as the max grows by ``δ = mk_old − mk_new`` (``2^δ`` rescales, ``a`` also gains ``δ·s``); lane rows
are combined the same way.  :func:`unshift` removes ``r`` once per row: the maximum's own term is
``e0 = 2^r`` as the loop computed it (same instruction, same input), so it is replaced by 1 and the
rest scaled by ``2^{−r}`` — a one-entry row gives ``s = 1``, ``a = 0``, ``q = 1`` exactly, and no
term is rounded to the ulp of a large common offset (``key·ku`` is never rounded on its own).
"""
import triton
import triton.language as tl

from .fast_math import exp2_ftz, mul_rn

FLT_MAX = tl.constexpr(3.4028234663852886e38)  # the largest finite fp32


@triton.jit
def lane_frame(k, nku):
    """``nmk = −fl(k·ku)`` from ``nku = −ku`` (the kernels carry the frame negated: it is the FFMA's
    addend, and a separate negation would cost an instruction where the compiler emits ``0 − x``),
    rounded once (never fused into a later add), capped at FLT_MAX so that a lane row with nothing
    finite yet (``k = −inf``) has a finite frame and ``fma(−inf, ku, nmk)`` is −inf, not NaN."""
    return tl.minimum(mul_rn(k, nku), FLT_MAX)


@triton.jit
def combine_lanes(k_l, nmk_l, s_l, a_l, q_l):
    """``(k_max, mk, s_c, a_c, q_c)`` of the row from its lane rows' ``[R]`` statistics (frames
    negated, ``nmk_l = −mk_l``), in the frame ``mk`` of the row's max key (the largest lane frame:
    ``lane_frame`` is monotone)."""
    k_max = tl.max(k_l, axis=0)
    mk = -tl.min(nmk_l, axis=0)
    delta = -(nmk_l + mk)  # mk_l − mk: exactly 0 for the lane rows at the max
    w = exp2_ftz(delta)
    s_c = tl.sum(s_l * w, axis=0)
    a_c = tl.sum((a_l + s_l * delta) * w, axis=0)
    q_c = tl.sum(q_l * (w * w), axis=0)
    return k_max, mk, s_c, a_c, q_c


@triton.jit
def unshift(k_max, mk, s_c, a_c, q_c, ku):
    """``(s, a, q)`` in the exact frame of ``k_max`` from the frame-``mk`` sums (module docstring):
    ``s = 1 + (s_c − e0)·2^{−r}``, ``a = 2^{−r}·((a_c − e0·r) − r·(s_c − e0))``,
    ``q = 1 + (q_c − e0²)·2^{−2r}`` with ``r = fma(k_max, ku, −mk)``, ``e0 = 2^r``.  The products
    ``e0·r`` and ``e0²`` are rounded as the loop rounded them (``mul_rn``: not fused into the
    subtraction), so an exact case stays exact.  A row with nothing finite keeps ``s = 0``."""
    r = tl.fma(k_max, ku, -mk)
    r = tl.where(k_max == -float("inf"), 0.0, r)
    e0 = exp2_ftz(r)
    g = tl.exp2(-r)
    rest = s_c - e0
    s = 1.0 + rest * g
    a = g * ((a_c - mul_rn(e0, r)) - r * rest)
    q = 1.0 + (q_c - mul_rn(e0, e0)) * (g * g)
    return s, a, q


@triton.jit
def _cols(x):
    """The even and odd columns of an ``[R, L]`` block (``L`` even), each ``[R, L/2]``: the same
    registers, no data movement (a thread owns whole rows)."""
    return tl.split(tl.reshape(x, [x.shape[0], x.shape[1] // 2, 2]))


@triton.jit
def fma_sum(acc, a, b):
    """``acc + Σ_j a[:, j]·b[:, j]`` over an ``[R, L]`` block (``L`` ∈ {1, 2, 4, 8}), one FFMA per
    element in a chain: ``tl.sum`` of the products is a tree (an FMUL and an FADD more per pair)."""
    L: tl.constexpr = a.shape[1]
    if L == 1:
        acc = tl.fma(tl.reshape(a, [a.shape[0]]), tl.reshape(b, [b.shape[0]]), acc)
    elif L == 2:
        a0, a1 = _cols(a)
        b0, b1 = _cols(b)
        acc = tl.fma(tl.reshape(a1, [a.shape[0]]), tl.reshape(b1, [a.shape[0]]),
                     tl.fma(tl.reshape(a0, [a.shape[0]]), tl.reshape(b0, [a.shape[0]]), acc))
    else:
        a0, a1 = _cols(a)
        b0, b1 = _cols(b)
        acc = fma_sum(fma_sum(acc, a0, b0), a1, b1)
    return acc
