"""Compile every Triton kernel of the project for sm_90 (H100/H200), without a GPU.

``python tests/compile_kernels.py`` runs Triton's whole pipeline (TTIR → PTX → cubin
through the bundled ptxas) for each kernel and each constexpr variant, so an API
that a Triton version lacks, or a type error in a branch the interpreter never
took, fails on a CPU machine instead of in a rare GPU session.  CI runs it with the
newest Triton and with 3.6 (the GPU image's).  Must run with TRITON_INTERPRET unset.
"""
import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SCALARS = {"scale": "fp32", "inv_temp": "fp32", "softcap": "fp32", "filter_eps": "fp32"}


def compile_kernel(kernel, types, constexprs, num_warps=8):
    """Compiles ``kernel`` with pointer/scalar ``types`` (default: fp32 pointers, i32
    scalars, i64 strides) and ``constexprs``; returns the compiled kernel."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        else:
            signature[name] = "i64" if name.startswith("stride") else "i32"
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps})


def flag_variants(names):
    """All-off, all-on and each flag alone: covers every branch without 2^n builds."""
    yield {n: 0 for n in names}
    yield {n: 1 for n in names}
    for n in names:
        yield {m: int(m == n) for m in names}


def token_cases():
    from kernels.token_backward import token_backward_kernel
    from kernels.token_forward import token_forward_kernel

    fwd_flags = ("SHIFT", "HAS_SOFTCAP", "WANT_ENTROPY", "WANT_LSQ", "WANT_MEAN", "WANT_TOP1",
                 "VOCAB_SHARD")
    bwd_flags = ("SHIFT", "HAS_SOFTCAP", "HAS_G", "GRAD_ENTROPY", "GRAD_LSQ", "GRAD_MEAN")
    for dtype, flags in itertools.product(("bf16", "fp16", "fp32"), flag_variants(fwd_flags)):
        types = {"x_ptr": f"*{dtype}", "y_ptr": "*i64", **SCALARS}
        yield token_forward_kernel, types, {**flags, "BLOCK_V": 4096}
    for dtype, flags in itertools.product(("bf16", "fp16", "fp32"), flag_variants(bwd_flags)):
        types = {"x_ptr": f"*{dtype}", "dx_ptr": f"*{dtype}", "y_ptr": "*i64", **SCALARS}
        yield token_backward_kernel, types, {**flags, "BLOCK_V": 4096}


def linear_cases():
    from kernels.linear_backward import linear_backward_kernel
    from kernels.linear_forward import linear_forward_kernel

    fwd_flags = ("HAS_BIAS", "HAS_SOFTCAP", "WANT_ENTROPY", "WANT_LSQ", "WANT_MEAN")
    bwd_flags = ("HAS_BIAS", "HAS_SOFTCAP", "FILTER", "HAS_G", "GRAD_ENTROPY", "GRAD_LSQ", "GRAD_MEAN",
                 "NEED_DH", "NEED_DW", "NEED_DB")
    tiles = dict(BLOCK_M=128, BLOCK_V=128, DOT_FP32=0, GROUP_M=8)
    for dtype in ("bf16", "fp16", "fp32"):
        types = {"h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}",
                 "rows_ptr": "*i64", "y_ptr": "*i64", **SCALARS}
        precision = dict(INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                         BLOCK_D=32 if dtype == "fp32" else 64)
        for flags in flag_variants(fwd_flags):
            yield linear_forward_kernel, types, {**flags, **tiles, **precision}
        for flags in flag_variants(bwd_flags):
            yield linear_backward_kernel, types, {**flags, **tiles, **precision}


def token_kl_cases():
    from kernels.token_kl_backward import token_kl_backward_kernel
    from kernels.token_kl_forward import token_kl_forward_kernel

    for dtype in ("bf16", "fp16", "fp32"):
        types = {"x_ptr": f"*{dtype}", "r_ptr": f"*{dtype}", "dx_ptr": f"*{dtype}", "y_ptr": "*i64",
                 **SCALARS}
        for flags in flag_variants(("SHIFT", "HAS_SOFTCAP", "WANT_LOGP")):
            yield token_kl_forward_kernel, types, {**flags, "BLOCK_V": 4096}
        for flags in flag_variants(("SHIFT", "HAS_SOFTCAP", "HAS_G_KL", "HAS_G_LOGP")):
            yield token_kl_backward_kernel, types, {**flags, "BLOCK_V": 4096}


CASE_SOURCES = [token_cases, linear_cases, token_kl_cases]


def main():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("compile_kernels.py must run with TRITON_INTERPRET unset")
    count = 0
    for source in CASE_SOURCES:
        for kernel, types, constexprs in source():
            try:
                compile_kernel(kernel, types, constexprs)
            except Exception as err:  # report which variant broke, then fail
                print(f"FAILED {kernel.__name__} {types} {constexprs}: {err}", file=sys.stderr)
                raise
            count += 1
    print(f"compiled {count} kernel variants for sm_90 with triton {triton.__version__}")


if __name__ == "__main__":
    main()
