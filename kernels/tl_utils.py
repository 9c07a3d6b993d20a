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
    # tanh(a) = 1 − 2 / (e^{2a} + 1): exact limits ±1 for |a| → ∞ (e^{2a} → inf or 0),
    # and it runs both compiled and under TRITON_INTERPRET (no libdevice needed).
    return 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)


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
