"""exp2 for the token kernels' reductions, flushing denormal results to zero.

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
else:
    @triton.jit
    def exp2_ftz(x):
        """2^x in fp32; results below 2⁻¹²⁶ may flush to 0 (one MUFU.EX2)."""
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def transform_log2(x, scale, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr):
    """``u = z·log2 e`` for the logits ``z`` of :func:`tl_utils.transform`, so that
    ``e^{z − m} = 2^{u − m·log2 e}``: without a softcap log2 e is folded into the one
    scale (``u = x · (scale/T · log2 e)``, a single FMUL)."""
    if HAS_SOFTCAP:
        u = transform(x, scale, inv_temp, softcap, HAS_SOFTCAP) * LOG2E
    else:
        u = x.to(tl.float32) * (scale * inv_temp * LOG2E)
    return u
