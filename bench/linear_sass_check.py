"""SASS check of the fused-linear kernels for sm_90a, without a GPU.

Compiles ``linear_forward_kernel`` / ``linear_backward_kernel`` the way a real launch
specializes them (ints equal to 1 become constexpr, ints divisible by 16 and every
pointer get the divisibility-16 hint, the launcher's constexprs and ``num_warps``),
disassembles the cubin with Triton's bundled ``cuobjdump`` and counts what matters for
these kernels:

* ``regs`` / ``local`` (bytes of local memory per thread) / ``spill_ops`` (STL + LDL);
* ``redg`` (fire-and-forget reductions), ``atomg`` (atomics that return a value),
  ``membar_gpu`` (GPU-scope fences), ``cctl`` (cache invalidations around acq_rel atomics);
* ``hgmma`` (Hopper warp-group MMA) vs ``hmma`` (Ampere-style MMA), ``utmaredg``
  (TMA reduce-add), ``instrs`` (total SASS instructions).

This is the fused-linear slice only; ``bench/static_profile.py`` (when present) is the
whole-project profiler.  Needs only ``triton`` (no torch, no GPU, TRITON_INTERPRET unset)::

    python bench/linear_sass_check.py                          # this interpreter's Triton
    python bench/linear_sass_check.py --also /tmp/t36/bin/python   # + Triton 3.6, one table
    python bench/linear_sass_check.py --json
"""
import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import types

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what launches get today; silences 3.9's warning
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Launch shapes: the headline size and SmolLM2's, and a vocabulary that is not a multiple
# of 16 (only the int specialization differs).  bf16 operands, fp32 accumulators.
SHAPES = {
    "16k x 128256 x 4096": dict(M=16384, V=128256, D=4096),
    "16k x 50257 x 4096": dict(M=16384, V=50257, D=4096),
}
TILES = dict(BLOCK_M=128, BLOCK_V=128, BLOCK_D=64, GROUP_M=8, num_warps=8)  # linear_launch.linear_config (GPU, bf16)


def _load_kernels():
    """Imports ``kernels.linear_*`` without running ``kernels/__init__`` (which needs torch)."""
    pkg = types.ModuleType("kernels")
    pkg.__path__ = [os.path.join(ROOT, "kernels")]
    sys.modules.setdefault("kernels", pkg)
    fwd = importlib.import_module("kernels.linear_forward")
    bwd = importlib.import_module("kernels.linear_backward")
    return fwd.linear_forward_kernel, bwd.linear_backward_kernel


def forward_args(M, V, D, sms=132):
    """Runtime arguments of a forward launch (``linear_launch.linear_forward`` on an H200), by name."""
    n_tiles = -(-V // TILES["BLOCK_V"])
    m_blocks = -(-M // TILES["BLOCK_M"])
    n_splits = max(1, min(n_tiles, -(-4 * sms // m_blocks)))
    tiles_per_split = -(-n_tiles // n_splits)
    n_splits = -(-n_tiles // tiles_per_split)
    args = dict(h_ptr="*bf16", stride_hn=D, stride_hd=1, w_ptr="*bf16", stride_wv=D, stride_wd=1,
                b_ptr="*bf16", rows_ptr="*i64", y_ptr="*i64", part_ptr="*fp32",
                M=M, V=V, D=D, tiles_per_split=tiles_per_split, n_splits=n_splits,
                scale=1.0, inv_temp=1.0, softcap=0.0)
    flags = dict(HAS_BIAS=0, HAS_SOFTCAP=0, WANT_ENTROPY=0, WANT_LSQ=0, WANT_MEAN=0,
                 DOT_FP32=0, INPUT_PRECISION="tf32", FLIP=0)
    return args, flags


def backward_args(M, V, D, need_dw=1, grad_filter=0):
    """Runtime arguments of a backward launch (``linear_launch.linear_backward``), by name."""
    args = dict(h_ptr="*bf16", stride_hn=D, stride_hd=1, w_ptr="*bf16", stride_wv=D, stride_wd=1,
                b_ptr="*bf16", rows_ptr="*i64", y_ptr="*i64", perm_ptr="*i64",
                lse_ptr="*fp32", g_ptr="*fp32", ent_ptr="*fp32", g_ent_ptr="*fp32", lsq_ptr="*fp32",
                g_lsq_ptr="*fp32", g_mean_ptr="*fp32",
                dh_ptr="*fp32", stride_dhn=D, stride_dhd=1,
                dw_ptr="*fp32", stride_dwv=D, stride_dwd=1, db_ptr="*fp32",
                M=M, V=V, D=D, scale=1.0, inv_temp=1.0, softcap=0.0, filter_eps=2.0 ** -12)
    flags = dict(HAS_BIAS=0, HAS_SOFTCAP=0, FILTER=grad_filter, PERMUTED=grad_filter, HAS_G=1, GRAD_ENTROPY=0, GRAD_LSQ=0, GRAD_MEAN=0,
                 NEED_DH=1, NEED_DW=need_dw, NEED_DB=0, DOT_FP32=0, INPUT_PRECISION="tf32")
    return args, flags


def specialize(kernel, args, constexprs):
    """``(signature, constexprs, attrs)`` as ``JITFunction._pack_args`` builds them at a launch.

    Pointers (given as their type string) are 16-byte aligned torch allocations → "D";
    ints go through Triton's own specializer (1 → constexpr, %16 → "D"); floats are fp32."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature, consts, attrs = {}, {}, {}
    extra = set(args) | set(constexprs)
    params = [p for p in kernel.arg_names]
    missing = [p for p in params if p not in extra]
    unknown = [p for p in extra if p not in params]
    if missing or unknown:
        raise ValueError(f"{kernel.__name__}: arguments missing {missing}, unknown {unknown}")
    for i, name in enumerate(params):
        if name in constexprs:
            signature[name], consts[name] = "constexpr", constexprs[name]
            continue
        val = args[name]
        if isinstance(val, str):  # a pointer
            ty, attr = val, "D"
        else:
            ty, attr = native_specialize_impl(BaseBackend, val, False, True, True)[:2]
        if ty == "constexpr":
            signature[name], consts[name] = "constexpr", attr
            continue
        signature[name] = ty
        if attr == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


def compile_sm90a(kernel, args, constexprs, num_warps):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, consts, attrs = specialize(kernel, args, constexprs)
    src = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def _tool(name):
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


OPCODES = {  # counted on the SASS opcode (first token after the address, before any '.')
    "redg": r"REDG?", "atomg": r"ATOMG", "hgmma": r"HGMMA", "hmma": r"HMMA", "utmaredg": r"UTMAREDG",
    "cctl": r"CCTL", "bar_sync": r"BAR",
}


def sass_counts(cubin: bytes, dump=None):
    """Counts from ``cuobjdump -sass`` and ``-res-usage`` of one cubin (SASS text to ``dump``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], check=True, capture_output=True,
                              text=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], check=True, capture_output=True,
                             text=True).stdout
    finally:
        os.unlink(f.name)
    if dump:
        with open(dump, "w") as out:
            out.write(sass)
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)", sass)
    out = {k: 0 for k in OPCODES}
    out.update(membar_gpu=0, membar_other=0, spill_ops=0, instrs=len(ops))
    for op, mods in ops:
        for key, pat in OPCODES.items():
            if re.fullmatch(pat, op):
                out[key] += 1
        if op == "MEMBAR":
            out["membar_gpu" if ".GPU" in mods or ".SYS" in mods else "membar_other"] += 1
        if op in ("STL", "LDL"):
            out["spill_ops"] += 1
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", res)
    out.update(regs=int(m.group(1)), local=int(m.group(2)))
    return out


def cases(fwd, bwd):
    tiles = {k: v for k, v in TILES.items() if k != "num_warps"}
    for shape, dims in SHAPES.items():
        a, f = forward_args(**dims)
        yield "linear_forward", shape, fwd, a, {**f, **tiles}
        a, f = backward_args(**dims)
        yield "linear_backward", shape, bwd, a, {**f, **tiles}
        if shape.startswith("16k x 128256"):
            a, f = backward_args(**dims, need_dw=0)
            yield "linear_backward (frozen W)", shape, bwd, a, {**f, **tiles}
            a, f = backward_args(**dims, grad_filter=1)
            yield "linear_backward (grad_filter)", shape, bwd, a, {**f, **tiles}


def run_here(dump_dir=None):
    import triton

    fwd, bwd = _load_kernels()
    rows = []
    for name, shape, kernel, args, consts in cases(fwd, bwd):
        k = compile_sm90a(kernel, args, consts, TILES["num_warps"])
        dump = None
        if dump_dir:
            os.makedirs(dump_dir, exist_ok=True)
            tag = re.sub(r"[^A-Za-z0-9.]+", "_", f"{name}_{shape}_triton{triton.__version__}")
            dump = os.path.join(dump_dir, tag + ".sass")
        rows.append(dict(kernel=name, triton=triton.__version__, shape=shape, smem=k.metadata.shared,
                         **sass_counts(k.asm["cubin"], dump)))
    return rows


COLUMNS = ("kernel", "triton", "shape", "regs", "local", "spill_ops", "smem", "redg", "atomg", "membar_gpu",
           "cctl", "hgmma", "hmma", "utmaredg", "instrs")


def markdown(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    ap.add_argument("--also", nargs="*", default=[], metavar="PYTHON",
                    help="other interpreters (another Triton) to run this script under and merge")
    ap.add_argument("--dump", metavar="DIR", help="also write each kernel's SASS to DIR")
    opts = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("linear_sass_check.py must run with TRITON_INTERPRET unset")
    rows = []
    for py in opts.also:
        cmd = [py, os.path.abspath(__file__), "--json"] + (["--dump", opts.dump] if opts.dump else [])
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"{py}: {run.stderr[-2000:]}")
        rows += json.loads(run.stdout)
    rows += run_here(opts.dump)
    rows.sort(key=lambda r: (r["kernel"], r["shape"], r["triton"]))
    print(json.dumps(rows, indent=1) if opts.json else markdown(rows))


if __name__ == "__main__":
    main()
