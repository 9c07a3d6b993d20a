"""Compile every Triton kernel of the project for sm_90a (H100/H200), without a GPU.

``python tests/compile_kernels.py`` runs Triton's whole pipeline (TTIR → PTX → cubin
through the bundled ptxas) for each kernel and each flag variant, so an API that a
Triton version lacks, or a type error in a branch the interpreter never took, fails
on a CPU machine instead of in a rare GPU session.  Every variant is a call of the
kernel's launcher (``kernels/*_launch.py``) on ``meta`` tensors: the launch is recorded
and compiled with the specialization a real launch gets (ints equal to 1 as constexprs,
divisibility-16 hints, aligned pointers: ``bench/launch_compile.py``, shared with
``bench/static_profile.py``).  CI runs it with the newest Triton and with 3.6 (the GPU
image's).  Must run with TRITON_INTERPRET unset.
"""
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_kernels.py must run with TRITON_INTERPRET unset")

import torch  # noqa: E402
import triton  # noqa: E402

from bench.launch_compile import compile_launch, h200_properties, record_launch  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
B, T, V = 2, 8, 50_257      # odd row stride: the peeled-head path
N, D, V_LIN = 16, 576, 49_152


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def flag_variants(names):
    """All-off, all-on and each flag alone: covers every branch without 2^n builds."""
    yield {n: False for n in names}
    yield {n: True for n in names}
    for n in names:
        yield {m: m == n for m in names}


def transform(softcap, negative_scale=False):
    return dict(ignore_index=-100, temperature=0.7, logit_scale=-1.5 if negative_scale else 1.5,
                softcap=30.0 if softcap else None)


def token_cases():
    from pyfused_po.kernels import token_launch as tk
    from pyfused_po.kernels.token_backward import token_backward_kernel
    from pyfused_po.kernels.token_forward import token_forward_kernel

    y, f, pairs = meta(B, T, dtype=torch.int64), meta(B, T), meta(B, T, 2)  # pairs: LSE (hi, lo)
    for dtype in DTYPES:
        x = meta(B, T, V, dtype=dtype)
        x_strided = meta(V, B, T, dtype=dtype).permute(1, 2, 0)  # vocabulary axis not contiguous
        for fl in flag_variants(("shift", "softcap", *tk.EXTRA_NAMES, "vocab_shard", "strided", "flip")):
            extras = tuple(n for n in tk.EXTRA_NAMES if fl[n])
            logits = x_strided if fl["strided"] else x
            yield token_forward_kernel, lambda logits=logits, fl=fl, extras=extras: tk.token_forward(
                logits, y, shift=fl["shift"], extras=extras, vocab_shard=fl["vocab_shard"],
                **transform(fl["softcap"], negative_scale=fl["flip"]))
        for fl in flag_variants(("shift", "softcap", "g", "g_ent", "g_lsq", "g_mean", "other_out")):
            out = meta(B, T, V + 3, dtype=dtype)[..., :V] if fl["other_out"] else torch.empty_like(x)
            grads = dict(grad_logp=f if fl["g"] else None,
                         entropy=f, grad_entropy=f if fl["g_ent"] else None,
                         log_sum_sq_probs=f, grad_log_sum_sq_probs=f if fl["g_lsq"] else None,
                         grad_mean_logit=f if fl["g_mean"] else None)
            yield token_backward_kernel, lambda out=out, fl=fl, grads=grads: tk.token_backward(
                x, y, pairs, out, shift=fl["shift"], **grads, **transform(fl["softcap"]))


def token_kl_cases():
    from pyfused_po.kernels import token_kl_launch as kl
    from pyfused_po.kernels.token_kl_backward import token_kl_backward_kernel
    from pyfused_po.kernels.token_kl_forward import token_kl_forward_kernel

    y, f, pairs = meta(B, T, dtype=torch.int64), meta(B, T), meta(B, T, 2)
    for dtype in DTYPES:
        x = meta(B, T, V, dtype=dtype)
        r_other = meta(B, T, V + 5, dtype=dtype)[..., :V]
        for fl in flag_variants(("shift", "softcap", "logp", "other_ref", "flip")):
            r = r_other if fl["other_ref"] else meta(B, T, V, dtype=dtype)
            yield token_kl_forward_kernel, lambda r=r, fl=fl: kl.token_kl_forward(
                x, r, y, shift=fl["shift"], want_logp=fl["logp"],
                **transform(fl["softcap"], negative_scale=fl["flip"]))
        for fl in flag_variants(("shift", "softcap", "g_kl", "g_logp", "other_ref")):
            r = r_other if fl["other_ref"] else meta(B, T, V, dtype=dtype)
            yield token_kl_backward_kernel, lambda r=r, fl=fl: kl.token_kl_backward(
                x, r, y, pairs, pairs, torch.empty_like(x), shift=fl["shift"],
                grad_kl=f if fl["g_kl"] else None, grad_logp=f if fl["g_logp"] else None,
                **transform(fl["softcap"]))


def linear_cases():
    from pyfused_po.kernels import linear_launch as ll
    from pyfused_po.kernels.linear_backward import linear_backward_kernel
    from pyfused_po.kernels.linear_forward import linear_forward_kernel

    rows, g, pairs = meta(N, dtype=torch.int64), meta(N), meta(N, 2)
    for dtype in DTYPES:
        h, w, b = meta(N, D, dtype=dtype), meta(V_LIN, D, dtype=dtype), meta(V_LIN, dtype=dtype)
        for fl in flag_variants(("bias", "softcap", "entropy", "log_sum_sq_probs", "mean_logit", "is_top1")):
            extras = tuple(n for n in ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1") if fl[n])
            yield linear_forward_kernel, lambda fl=fl, extras=extras: ll.linear_forward(
                h, w, b if fl["bias"] else None, rows, rows, extras=extras, **transform(fl["softcap"]))
        for fl in flag_variants(("bias", "softcap", "g", "g_ent", "g_lsq", "g_mean", "dh", "dw", "db", "filter")):
            yield linear_backward_kernel, lambda fl=fl: ll.linear_backward(
                h, w, b if fl["bias"] else None, rows, rows, pairs,
                grad_logp=g if fl["g"] else None, entropy=g, grad_entropy=g if fl["g_ent"] else None,
                log_sum_sq_probs=g, grad_log_sum_sq_probs=g if fl["g_lsq"] else None,
                grad_mean_logit=g if fl["g_mean"] else None,
                # (at least one gradient, or the launcher has nothing to launch)
                need_hidden=fl["dh"] or not (fl["dw"] or (fl["db"] and fl["bias"])),
                need_weight=fl["dw"], need_bias=fl["db"],
                grad_filter=2.0 ** -12 if fl["filter"] else None,  # FILTER and PERMUTED
                **transform(fl["softcap"]))


def truncated_cases():
    from pyfused_po.kernels import truncated_launch as tr
    from pyfused_po.kernels.truncated_select import truncated_backward_kernel, truncated_forward_kernel

    C = 8
    y, f, stats = meta(C, dtype=torch.int64), meta(C), meta(C, 2)
    for dtype in DTYPES:
        x = meta(C, V, dtype=dtype)
        for fl in flag_variants(("top_k", "top_p", "min_p", "minp_first", "softcap", "flip", "entropy")):
            yield truncated_forward_kernel, lambda fl=fl: tr.fold_forward(
                x, y, top_k=50 if fl["top_k"] else None, top_p=0.9 if fl["top_p"] else None,
                min_p=0.05 if fl["min_p"] or fl["minp_first"] else None, minp_first=fl["minp_first"],
                with_entropy=fl["entropy"], **_transform_only(transform(fl["softcap"], negative_scale=fl["flip"])))
        for fl in flag_variants(("softcap", "g", "g_ent")):
            yield truncated_backward_kernel, lambda fl=fl: tr.fold_backward(
                x, y, stats, grad_logp=f if fl["g"] or not fl["g_ent"] else None,
                grad_entropy=f if fl["g_ent"] else None, entropy=f, **_transform_only(transform(fl["softcap"])))


def _transform_only(kw):
    return {k: v for k, v in kw.items() if k != "ignore_index"}


CASE_SOURCES = [token_cases, token_kl_cases, linear_cases, truncated_cases]


def main():
    count = 0
    for source in CASE_SOURCES:
        for kernel, call in source():
            try:
                with h200_properties():
                    launch = record_launch(kernel, call)
                compile_launch(launch)
            except Exception as err:  # report which variant broke, then fail
                print(f"FAILED {kernel.fn.__name__} ({source.__name__}): {err}", file=sys.stderr)
                raise
            count += 1
    print(f"compiled {count} kernel variants for sm_90a with triton {triton.__version__}")


if __name__ == "__main__":
    main()
