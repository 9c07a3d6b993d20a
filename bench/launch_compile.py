"""Compile a kernel exactly as a real launch would specialize it, without a GPU.

A launcher (``kernels/token_launch.py`` …) is called with ``meta`` tensors of the real
shapes; the kernel's ``run`` is swapped for a recorder for that one call, so the
launcher's own choices (strides, block sizes, flags, grid) are what get compiled.  The
recorded arguments then go through Triton's own binder (``create_function_from_signature``
and ``JITFunction._pack_args``, the code ``JITFunction.run`` uses), which applies the
launch specialization: integers equal to 1 become constexprs, integers divisible by 16
and 16-byte-aligned pointers get ``tt.divisibility = 16``, i32 or i64 by value.  Meta
tensors have address 0, i.e. the alignment of a fresh allocation.

Works with Triton 3.6 through 3.9 (same binder API).  Must run with TRITON_INTERPRET
unset: under the interpreter ``@triton.jit`` builds no ``JITFunction``.
"""
import contextlib
import io
from dataclasses import dataclass
from types import SimpleNamespace
from unittest import mock

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

HOPPER = GPUTarget("cuda", 90, 32)  # Triton compiles capability 90 for sm_90a
H200_SMS = 132


@contextlib.contextmanager
def h200_properties():
    """Launchers that size grids from ``torch.cuda.get_device_properties`` see an H200."""
    import torch

    props = SimpleNamespace(multi_processor_count=H200_SMS, total_memory=141 * 2**30, major=9, minor=0)
    with mock.patch.object(torch.cuda, "get_device_properties", lambda *a, **k: props):
        yield props


@dataclass
class Launch:
    kernel: object   # the JITFunction
    args: tuple
    kwargs: dict
    grid: object


def record_launch(kernel, call):
    """Runs ``call()`` (a launcher invocation) with ``kernel`` recording instead of running.

    Returns the :class:`Launch` of its single launch of ``kernel``."""
    seen = []

    def recorder(*args, grid, warmup, **kwargs):
        seen.append(Launch(kernel, args, kwargs, grid))

    kernel.run = recorder  # instance attribute shadows JITFunction.run
    try:
        call()
    finally:
        del kernel.run
    if len(seen) != 1:
        raise RuntimeError(f"expected one launch of {kernel.fn.__name__}, got {len(seen)}")
    return seen[0]


def specialize(launch: Launch, target=HOPPER):
    """``(signature, constexprs, attrs, options)`` that ``JITFunction.run`` would compile with."""
    kernel = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.kwargs)
    bound, spec, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    return signature, constexprs, attrs, options


def compile_launch(launch: Launch, target=HOPPER):
    """Compiles the recorded launch for ``target``; returns ``(CompiledKernel, ptxas -v log)``.

    The log is empty when Triton's cache already held the kernel (ptxas did not run):
    point ``TRITON_CACHE_DIR`` at a fresh directory to always get it."""
    signature, constexprs, attrs, options = specialize(launch, target)
    src = ASTSource(launch.kernel, signature, constexprs, attrs)
    from triton import knobs

    log = io.StringIO()
    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log = old
    return compiled, log.getvalue()


def describe_specialization(launch: Launch, target=HOPPER) -> dict:
    """Per argument name: its compiled type and hints, e.g. ``{"stride_xv": "constexpr=1",
    "V": "i32 div16", "x_ptr": "*bf16 div16"}`` (for reports and tests)."""
    signature, constexprs, attrs, _ = specialize(launch, target)
    names = list(signature)
    out = {}
    for i, name in enumerate(names):
        kind = signature[name]
        if kind == "constexpr":
            out[name] = f"constexpr={constexprs.get((i,))!r}"
            continue
        hints = [f"div{v}" for k, v in attrs.get((i,), []) if k == "tt.divisibility"]
        out[name] = " ".join([kind, *hints])
    return out
