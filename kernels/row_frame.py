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
def lane_frame(k, ku):
    """``mk = fl(k·ku)``, rounded once (never fused into a later add), floored at −FLT_MAX so that a
    lane row with nothing finite yet (``k = −inf``) has a finite frame and ``fma(−inf, ku, −mk)``
    is −inf, not NaN."""
    return tl.maximum(mul_rn(k, ku), -FLT_MAX)


@triton.jit
def combine_lanes(k_l, mk_l, s_l, a_l, q_l):
    """``(k_max, mk, s_c, a_c, q_c)`` of the row from its lane rows' ``[R]`` statistics, in the frame
    ``mk`` of the row's max key (the largest lane frame: ``lane_frame`` is monotone)."""
    k_max = tl.max(k_l, axis=0)
    mk = tl.max(mk_l, axis=0)
    delta = mk_l - mk
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
