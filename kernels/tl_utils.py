"""Small @triton.jit helpers shared by the token-stage kernels.

The logit transform used everywhere is

    z = softcap(x · logit_scale) / temperature,   softcap(u) = c · tanh(u / c)

with ``softcap`` optional.  Kernels receive ``scale = logit_scale`` and
``inv_temp = 1 / temperature`` and call :func:`transform` / :func:`transform_grad`.
"""
import triton
import triton.language as tl


@triton.jit
def tanh(a):
    # tanh(a) = sign(a)·(1 − e)/(1 + e) with e = e^{−2|a|} ∈ [0, 1]: no overflow, exact
    # limits ±1.  For |a| < 1/8, 1 − e cancels (a softcap c ≫ |x| makes every a small, and
    # c·tanh(x/c) then lost ~c·1e-7 absolute), so there the odd Taylor series to a⁹ is used:
    # its first omitted term, 1382/155925·a¹¹, is < 1e-11 relative.  Runs compiled and
    # under TRITON_INTERPRET (no libdevice needed).
    m = tl.abs(a)
    e = tl.exp(-2.0 * m)
    far = (1.0 - e) / (1.0 + e)
    a2 = a * a
    near = m * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    t = tl.where(m < 0.125, near, far)
    return tl.where(a < 0, -t, t)


@triton.jit
def transform(x, scale, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr):
    """fp32 logits ``z`` from raw logits ``x`` (any float dtype)."""
    x = x.to(tl.float32)
    if HAS_SOFTCAP:
        z = softcap * tanh(x * scale / softcap) * inv_temp
    else:
        z = x * (scale * inv_temp)
    return z


@triton.jit
def logit_minus(x, hi, scale, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr):
    """``transform(x) − hi`` rounded once: without a softcap one FMA of the exact product
    ``x·scale/T`` (what the forward kernels reduce, by key differences), so that with the LSE
    pair's ``lo`` (which holds the max logit's own rounding error) the result is exact near
    the max for any scale and temperature."""
    if HAS_SOFTCAP:
        d = transform(x, scale, inv_temp, softcap, HAS_SOFTCAP) - hi
    else:
        d = tl.fma(x.to(tl.float32), scale * inv_temp, -hi)
    return d


@triton.jit
def transform_grad(x, scale, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr):
    """dz/dx of :func:`transform` (fp32): ``scale/T · (1 − tanh²(x·scale/c))`` with a softcap."""
    if HAS_SOFTCAP:
        t = tanh(x.to(tl.float32) * scale / softcap)
        d = (scale * inv_temp) * (1.0 - t * t)
    else:
        d = scale * inv_temp
    return d


@triton.jit
def row_target(y_ptr, stride_yb, stride_yt, T, ignore_index, SHIFT: tl.constexpr):
    """This program's logits row and its label, for kernels with one program per row of a
    ``[B, T, V]`` view.

    Returns ``(row, b, t, out, has_label, y)``: ``row = b·T + t`` (int64, so offsets never
    overflow), ``out`` the index of its result in the ``[B, T]`` outputs (aligned with the
    labels: ``t + 1`` under ``SHIFT``), ``has_label`` false for the last row under
    ``SHIFT``, and ``y`` the int64 label (``ignore_index`` when there is none).
    """
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    out = b * T + t + SHIFT
    has_label = t + SHIFT < T
    y = tl.load(y_ptr + b * stride_yb + (t + SHIFT) * stride_yt, mask=has_label, other=ignore_index)
    return row, b, t, out, has_label, y.to(tl.int64)
