"""exp2 for the token kernels' reductions (flushing denormal results to zero), and the
logit keys whose differences they exponentiate.

``tl.exp2`` lowers to ``ex2.approx.f32``, which ptxas wraps in a denormal fix-up
(compare, scale the input, square the result: ~4 instructions).  The ``.ftz`` form is
a single MUFU.EX2.  Flushing changes only results below 2⁻¹²⁶, so it is used where such
a value can never reach an output: terms of a sum that already holds e⁰ = 1 (the
running max's own term), which fp32 rounding would drop anyway.  Gradients keep
``tl.exp2`` (a bf16 or fp32 gradient can hold a subnormal).

Under ``TRITON_INTERPRET`` there is no inline PTX; ``tl.exp2`` stands in (it differs
only below 2⁻¹²⁶, which the callers' outputs cannot see).
"""
import os

import triton
import triton.language as tl

from .row_split import lane_offsets, vocab_offset
from .tl_utils import transform

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e):  e^z = 2^(z·log2 e)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2):  2^t = e^(t·ln 2)

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    @triton.jit
    def exp2_ftz(x):
        """2^x in fp32; results below 2⁻¹²⁶ may flush to 0."""
        return tl.exp2(x)

    @triton.jit
    def mul_rn(a, b):
        """a·b rounded to fp32 (never contracted into an FMA)."""
        return a * b
else:
    @triton.jit
    def mul_rn(a, b):
        """a·b rounded to fp32 (``mul.rn``: ptxas never contracts it into an FMA)."""
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b],
                                         dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def exp2_ftz(x):
        """2^x in fp32; results below 2⁻¹²⁶ may flush to 0 (one MUFU.EX2)."""
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def logit_key(x, scale, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr, FLIP: tl.constexpr):
    """fp32 key whose maximum marks the row's largest logit: ``z`` itself with a softcap;
    without one ``±x`` (``z = x·scale/T`` is monotone in x; ``FLIP`` when scale/T < 0), so
    the row max costs no multiply and the max logit is recovered exactly, see
    :func:`key_logit`."""
    if HAS_SOFTCAP:
        key = transform(x, scale, inv_temp, softcap, HAS_SOFTCAP)
    else:
        key = x.to(tl.float32)
        if FLIP:
            key = -key
    return key


@triton.jit
def reads_words(x_ptr, HAS_SOFTCAP: tl.constexpr, LANE: tl.constexpr, ALIGN: tl.constexpr):
    """Whether :func:`body_keys` reads the row as 32-bit words (constexpr): bf16, a contiguous
    vocabulary, no softcap, lane rows of an even number of elements (a tiny vocabulary's may be 1)."""
    return (x_ptr.dtype.element_ty == tl.bfloat16) and (ALIGN == 8) and (not HAS_SOFTCAP) and (LANE % 2 == 0)


@triton.jit
def word_block(lo, hi):
    """The ``[R, 2·W]`` block whose columns alternate ``lo`` and ``hi`` (``[R, W]`` each): a word's two
    elements back in row order, in the register layout of :func:`body_keys`' word blocks."""
    return tl.reshape(tl.join(lo, hi), [lo.shape[0], 2 * lo.shape[1]])


@triton.jit
def body_keys(x_body, stride_xv, scale, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr, FLIP: tl.constexpr,
              BLOCK_V: tl.constexpr, LANE: tl.constexpr, ALIGN: tl.constexpr):
    """:func:`logit_key` of the body block of ``BLOCK_V`` elements at ``x_body``, as an ``[BLOCK_V // LANE, LANE]`` block (``kernels/row_split.py``).

    bf16 rows with a contiguous vocabulary are read as 32-bit words, two elements each, and widened
    by bit operations: the low element is ``w << 16`` and the high one ``w & 0xFFFF0000`` (one
    instruction each), where converting a bf16 high half costs two (a byte permute and a shift).
    ``tl.join`` puts each word's two elements back in row order."""
    if reads_words(x_body, HAS_SOFTCAP, LANE, ALIGN):
        words = tl.load(x_body.to(tl.pointer_type(tl.int32)) + lane_offsets(BLOCK_V // 2, LANE // 2))
        lo = (words << 16).to(tl.float32, bitcast=True)
        hi = (words & -65536).to(tl.float32, bitcast=True)
        key = word_block(lo, hi)
        if FLIP:
            key = -key
    else:
        x = tl.load(x_body + vocab_offset(lane_offsets(BLOCK_V, LANE), ALIGN) * stride_xv)
        key = logit_key(x, scale, inv_temp, softcap, HAS_SOFTCAP, FLIP)
    return key


@triton.jit
def key_scales(scale, inv_temp, HAS_SOFTCAP: tl.constexpr, FLIP: tl.constexpr):
    """``(kz, ku)`` with ``z = key·kz`` (bit-identical to ``tl_utils.transform``: the negation
    of a FLIP cancels exactly) and ``ku = kz·log2 e``: e^{z − m} = 2^{(key − k_max)·ku}, the key
    difference exact near the max (log2 e folded into the scale)."""
    if HAS_SOFTCAP:
        kz = 1.0
        ku = LOG2E * 1.0
    else:
        kz = scale * inv_temp
        if FLIP:
            kz = -kz
        ku = kz * LOG2E
    return kz, ku


@triton.jit
def key_logit(key, kz, HAS_SOFTCAP: tl.constexpr):
    """The natural logit ``z`` of the element with ``key``."""
    if HAS_SOFTCAP:
        z = key
    else:
        z = key * kz
    return z


@triton.jit
def max_logit(k_max, kz, HAS_SOFTCAP: tl.constexpr):
    """``(m, r)``: the row's max logit ``m = fl(k_max·kz)`` (0 for an all −inf row; rounded once
    with ``mul_rn``, so that no later add is fused with the product) and its rounding error
    ``r = k_max·kz − m``, exact by one FMA.  The LSE pair carries ``r`` in ``lo``, so the
    backward's ``fma(x, scale/T, −hi)`` sees the max of the exact ``x·scale/T`` the forward
    reduced (``r = 0`` with a softcap: the key is the logit)."""
    k_ref = tl.where(k_max == -float("inf"), 0.0, k_max)
    if HAS_SOFTCAP:
        m = k_ref
        r = 0.0 * k_ref
    else:
        m = mul_rn(k_ref, kz)
        r = tl.fma(k_ref, kz, -m)
    return m, r
