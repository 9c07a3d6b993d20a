"""Static profile of every Triton kernel for sm_90a (H100/H200), without a GPU.

Each kernel is compiled through its real launcher (``meta`` tensors of the headline
shapes, the launch specialization Triton applies: see ``bench/launch_compile.py``), and
its cubin is read back with the ``cuobjdump`` that ships with Triton:

* ptxas: registers, spill bytes, shared memory, resident warps per SM;
* SASS: HGMMA vs HMMA, LDG.128 / scalar LDG.U16, STG.128, REDG vs ATOMG, GPU-scope
  fences (MEMBAR.*.GPU), and for the token kernels the main loop's instructions per
  element: the largest loop body (found by its backward branch) divided by the
  elements one thread handles per trip (bytes its LDGs load ÷ element size ÷ rows read).

    python bench/static_profile.py                     # Markdown table to stdout
    python bench/static_profile.py --json              # list of records
    python bench/static_profile.py --write bench/results/static-sm90a
    python bench/static_profile.py --check bench/results/static-sm90a   # CI guard

Shapes: 16 × 1024 tokens (the headline 8 pairs × 1024), V = 128,256 and V = 50,257
(odd row stride), bf16, D = 4096 on the fused-linear path.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("static_profile.py must run with TRITON_INTERPRET unset (0)")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# A fresh cache: ptxas must run for every kernel so that its -v log (spills) is seen.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="static-profile-")

import torch  # noqa: E402
import triton  # noqa: E402

from bench import sass_stats  # noqa: E402
from bench.launch_compile import (compile_launch, describe_specialization, h200_properties,  # noqa: E402
                                  record_launch)
from bench.static_guards import ROWS_READ, VARIANTS, _minor, check, committed_records  # noqa: E402

TOKENS_B, TOKENS_T = 16, 1024   # bench/cases.py: HEADLINE_PAIRS = 8 pairs of 1024 tokens
HIDDEN = 4096
VOCABS = (128_256, 50_257)
DTYPE = torch.bfloat16
# Each row is a kernel variant that a default entry point launches (extras are constexpr flags: each
# set is its own machine code).  ``static_guards.VARIANTS`` says who launches which and its budget.
KERNELS = ("token_forward", "token_forward_mean", "token_forward_rl", "token_forward_sft",
           "token_forward_kto", "token_forward_dpo", "token_forward_extras", "token_backward",
           "fold_forward", "fold_backward", "token_kl_forward", "token_kl_backward", "truncated_forward",
           "truncated_backward", "linear_forward", "linear_backward")
FOLD_TOKENS = 4096  # the three-GEMM plan's chunk at D = 4096 (torch_backend.linear.gradient_chunk_size)
TILE_ROWS = 128  # a truncated-support tile (truncated_logprobs.INVARIANT_TILE_ROWS; any count compiles the same)


def _meta(*shape, dtype=DTYPE):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _token_common():
    return dict(ignore_index=-100, shift=True, temperature=1.0, logit_scale=1.0, softcap=None)


def launch_of(name, V):
    """The recorded launch of kernel ``name`` at vocabulary ``V`` (headline token count)."""
    from pyfused_po.kernels import linear_launch, token_kl_launch, token_launch
    from pyfused_po.kernels.linear_backward import linear_backward_kernel
    from pyfused_po.kernels.linear_forward import linear_forward_kernel
    from pyfused_po.kernels.token_backward import token_backward_kernel
    from pyfused_po.kernels.token_forward import token_forward_kernel
    from pyfused_po.kernels.token_kl_backward import token_kl_backward_kernel
    from pyfused_po.kernels.token_kl_forward import token_kl_forward_kernel
    from pyfused_po.kernels import truncated_launch
    from pyfused_po.kernels.truncated_select import truncated_backward_kernel, truncated_forward_kernel

    B, T = TOKENS_B, TOKENS_T
    x, r = _meta(B, T, V), _meta(B, T, V)
    y = _meta(B, T, dtype=torch.int64)
    f32 = _meta(B, T, dtype=torch.float32)
    pairs = _meta(B, T, 2, dtype=torch.float32)  # LSE pairs (kernels/lse_pair.py)
    common = _token_common()
    N = B * T
    h, w = _meta(N, HIDDEN), _meta(V, HIDDEN)
    rows = _meta(N, dtype=torch.int64)
    g = _meta(N, dtype=torch.float32)
    g_pairs = _meta(N, 2, dtype=torch.float32)
    lin = dict(ignore_index=-100, temperature=1.0, logit_scale=1.0, softcap=None)
    # The chunked fused-linear fold (every default linear path, the three-GEMM plan included): a
    # [1, C, V] chunk of logits, labels already shifted, backward in place with the forward's lse.
    xc, yc = _meta(1, FOLD_TOKENS, V), _meta(1, FOLD_TOKENS, dtype=torch.int64)
    fold = dict(common, shift=False)
    # A truncated-support tile: [TILE_ROWS, V] raw logits rows gathered by truncated_logprobs.
    xt, yt = _meta(TILE_ROWS, V), _meta(TILE_ROWS, dtype=torch.int64)
    trunc = dict(logit_scale=1.0, temperature=1.0, softcap=None)

    def forward(extras):
        return token_forward_kernel, lambda: token_launch.token_forward(x, y, extras=extras, **common)

    calls = {name: forward(extras) for name, extras in
             ((k, v["extras"]) for k, v in VARIANTS.items() if v["kernel"] == "token_forward")}
    calls.update({
        "fold_forward": (token_forward_kernel,
                         lambda: token_launch.token_forward(xc, yc, extras=("mean_logit",), **fold)),
        "fold_backward": (token_backward_kernel,
                          lambda: token_launch.token_backward(xc, yc, _meta(1, FOLD_TOKENS, 2, dtype=torch.float32),
                                                              xc, grad_logp=_meta(1, FOLD_TOKENS, dtype=torch.float32),
                                                              vocab_shard=True, **fold)),
        "token_backward": (token_backward_kernel,
                           lambda: token_launch.token_backward(x, y, pairs, torch.empty_like(x),
                                                               grad_logp=f32, **common)),
        "token_kl_forward": (token_kl_forward_kernel,
                             lambda: token_kl_launch.token_kl_forward(x, r, y, **common)),
        "token_kl_backward": (token_kl_backward_kernel,
                              lambda: token_kl_launch.token_kl_backward(
                                  x, r, y, pairs, pairs, torch.empty_like(x), grad_kl=f32,
                                  grad_logp=f32, **common)),
        "truncated_forward": (truncated_forward_kernel, lambda: truncated_launch.fold_forward(
            xt, yt, top_k=50, top_p=0.9, min_p=None, minp_first=False, with_entropy=False, **trunc)),
        "truncated_backward": (truncated_backward_kernel, lambda: truncated_launch.fold_backward(
            xt, yt, _meta(TILE_ROWS, 2, dtype=torch.float32), grad_logp=_meta(TILE_ROWS, dtype=torch.float32),
            **trunc)),
        "linear_forward": (linear_forward_kernel,
                           lambda: linear_launch.linear_forward(h, w, None, rows, rows, **lin)),
        "linear_backward": (linear_backward_kernel,
                            lambda: linear_launch.linear_backward(h, w, None, rows, rows, g_pairs,
                                                                  grad_logp=g, **lin)),
    })
    kernel, call = calls[name]
    with h200_properties():  # the launchers size split counts from the device
        return record_launch(kernel, call)


def _tool(name):
    from triton.backends.nvidia import compiler as nv

    path = os.path.join(os.path.dirname(nv.__file__), "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found next to Triton's ptxas ({path})")
    return path


def profile_kernel(name, V, sass_dir=None):
    """One record: compile ``name`` at ``V`` and read its ptxas log, resources and SASS
    (written to ``sass_dir/<name>-V<V>.sass`` when given)."""
    launch = launch_of(name, V)
    t0 = time.time()
    compiled, log = compile_launch(launch)
    seconds = time.time() - t0
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], check=True,
                              capture_output=True, text=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    if sass_dir:
        os.makedirs(sass_dir, exist_ok=True)
        with open(os.path.join(sass_dir, f"{name}-V{V}.sass"), "w") as f:
            f.write(sass)
    instrs = sass_stats.parse_sass(sass)
    usage = sass_stats.resource_usage(res)
    spills = sass_stats.ptxas_spills(log)
    if spills is None:  # no ptxas log (cached build): local memory is the spill space
        spills = usage["local"]
    num_warps = compiled.metadata.num_warps
    smem = max(compiled.metadata.shared, usage["smem_static"])
    const = describe_specialization(launch)
    variant = VARIANTS[name]
    rec = {
        "kernel": name,
        "triton": triton.__version__,
        "shape": (f"{TOKENS_B}x{TOKENS_T}x{V} bf16" if name.startswith("token")
                  else f"1x{FOLD_TOKENS}x{V} bf16" if name.startswith("fold")
                  else f"{TILE_ROWS}x{V} bf16 tile" if name.startswith("truncated")
                  else f"N{TOKENS_B * TOKENS_T} V{V} D{HIDDEN} bf16"),
        "launched_by": variant["launched_by"],
        "budget": variant["budget"],
        "V": V,
        "regs": usage["regs"],
        "spills": spills,
        "smem": smem,
        "num_warps": num_warps,
        "warps_per_sm": sass_stats.occupancy_warps(usage["regs"], smem, num_warps),
        **sass_stats.opcode_counts(instrs),
        "instr": len(instrs),
        "instr_per_elem": None,
        "compile_s": round(seconds, 2),
        "specialization": const,
    }
    loop = sass_stats.main_loop(instrs)
    if loop is not None:
        rec.update(sass_stats.loop_counts(loop))
    if "passes" in variant:  # a multi-pass kernel: instructions per element summed over its passes
        row_loops = [lp for lp in sass_stats.loops(instrs) if sass_stats.loop_counts(lp)["loop_ldg_bytes"]]
        rec["row_loops"] = len(row_loops)
        rec["instr_per_elem"] = round(sum(lp.size / (sass_stats.loop_counts(lp)["loop_ldg_bytes"] / 2)
                                          for lp in row_loops), 3)
    elif name in ROWS_READ and loop is not None:
        elt = 2  # bf16
        elems = rec["loop_ldg_bytes"] / (elt * ROWS_READ[name])
        block_v = int(const["BLOCK_V"].split("=")[1])
        rec["elems_per_trip"] = elems if elems else block_v / (32 * num_warps)
        rec["instr_per_elem"] = round(loop.size / rec["elems_per_trip"], 3)
    return rec


def profile(kernels=KERNELS, vocabs=VOCABS, log=sys.stderr, sass_dir=None):
    records = []
    for V in vocabs:
        for name in kernels:
            rec = profile_kernel(name, V, sass_dir)
            print(f"  {name:22s} V={V:<7d} {rec['compile_s']:6.1f} s", file=log)
            records.append(rec)
    return records


COLUMNS = (("kernel", "kernel"), ("V", "V"), ("instr_per_elem", "instr/elem"), ("budget", "budget"),
           ("regs", "regs"), ("spills", "spills"),
           ("smem", "smem B"), ("warps_per_sm", "warps/SM"),
           ("loop_instr", "loop instr"), ("loop_bar_sync", "BAR/trip"), ("loop_shfl", "SHFL/trip"),
           ("loop_ldg128", "LDG.128/trip"), ("loop_stg128", "STG.128/trip"),
           ("ldg128", "LDG.128"), ("ldg_u16", "LDG.U16"), ("stg128", "STG.128"),
           ("stg_u16", "STG.U16"), ("hgmma", "HGMMA"), ("hmma", "HMMA"), ("redg", "REDG"),
           ("atomg", "ATOMG"), ("membar_gpu", "MEMBAR.GPU"))


def markdown(records) -> str:
    """One table per Triton version."""
    out = []
    for version in sorted({r["triton"] for r in records}):
        out.append(f"### Triton {version}, sm_90a\n")
        out.append("| " + " | ".join(h for _, h in COLUMNS) + " |")
        out.append("|" + "---|" * len(COLUMNS))
        for r in records:
            if r["triton"] == version:
                out.append("| " + " | ".join("–" if r.get(k) is None else str(r.get(k))
                                             for k, _ in COLUMNS) + " |")
        out.append("")
    out.append("Who launches each variant (budget: main-loop instructions per element; "
               "`bench/static_guards.py`):\n")
    out.append("| kernel | launched by | budget |")
    out.append("|---|---|---|")
    for name in dict.fromkeys(r["kernel"] for r in records):
        v = VARIANTS[name]
        out.append(f"| {name} | {v['launched_by']} | {'–' if v['budget'] is None else v['budget']} |")
    out.append("")
    return "\n".join(out)


def write(records, directory):
    os.makedirs(directory, exist_ok=True)
    version = _minor(triton.__version__)
    with open(os.path.join(directory, f"profile-triton{version}.json"), "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    with open(os.path.join(directory, f"profile-triton{version}.md"), "w") as f:
        f.write(f"# Static profile, sm_90a, Triton {triton.__version__}\n\n")
        f.write("`python bench/static_profile.py --write bench/results/static-sm90a` "
                "(no GPU: ptxas + cuobjdump from Triton).\n\n")
        f.write(markdown(records))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the records as a JSON list")
    ap.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    ap.add_argument("--vocab", nargs="+", type=int, default=list(VOCABS))
    ap.add_argument("--write", metavar="DIR", help="write profile-triton<ver>.{json,md} into DIR")
    ap.add_argument("--sass", metavar="DIR", help="also write each kernel's SASS into DIR")
    ap.add_argument("--check", metavar="DIR", help="fail when a guard breaks against DIR's profile")
    ap.add_argument("--expect-fail", nargs="*", default=[], metavar="GUARD",
                    help="guards reported but not failing (known open work)")
    args = ap.parse_args(argv)
    t0 = time.time()
    records = profile(args.kernels, args.vocab, sass_dir=args.sass)
    print(f"profiled {len(records)} kernels with triton {triton.__version__} in "
          f"{time.time() - t0:.0f} s", file=sys.stderr)
    if args.write:
        write(records, args.write)
    if args.json:
        print(json.dumps(records, indent=1))
    elif not args.check:
        print(markdown(records))
    if args.check:
        committed = committed_records(args.check, triton.__version__)
        if not committed:
            print(f"no committed profile for triton {triton.__version__} in {args.check}: "
                  "only the absolute guards apply", file=sys.stderr)
        failed = False
        for guard, msgs in check(records, committed).items():
            for msg in msgs:
                tag = "EXPECTED-FAIL" if guard in args.expect_fail else "FAIL"
                print(f"{tag} [{guard}] {msg}", file=sys.stderr)
            failed |= bool(msgs) and guard not in args.expect_fail
        if failed:
            sys.exit(1)
        print("static profile guards hold", file=sys.stderr)


if __name__ == "__main__":
    main()
