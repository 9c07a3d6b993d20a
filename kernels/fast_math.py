"""exp2 for the token kernels' reductions (flushing denormal results to zero), and the
base-2 logits they exponentiate.

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

from .tl_utils import transform

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e):  e^z = 2^(z·log2 e)
LN2 = tl.constexpr(0.6931471805599453)    # ln(2):    log z = ln2 · log2 z

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
def key_scales(scale, inv_temp, HAS_SOFTCAP: tl.constexpr, FLIP: tl.constexpr):
    """``(kz, ku)`` with ``z = key·kz`` (bit-identical to ``tl_utils.transform``: the negation
    of a FLIP cancels exactly) and ``u = key·ku = z·log2 e`` (log2 e folded into the scale)."""
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
def key_log2(key, ku):
    """``u = z·log2 e`` of the element with ``key``, rounded once (``mul.rn``: never fused
    into a later add), so ``u − max u`` is exactly 0 at the maximum: 2⁰ = 1."""
    return mul_rn(key, ku)
