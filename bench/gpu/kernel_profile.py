"""Per-kernel table of one training step (forward + backward) under ``torch.profiler``, for the
fused-linear methods a user runs, beside cuBLAS at the same GEMM shapes.

    python bench/gpu/kernel_profile.py --out DIR [--methods a,b] [--toy]

For each method (default: the module's default plan, ``apply(DPOTrainer)``'s head, the staged
``linear_token_logprobs`` + ``preference_loss``, TRL's chunked head with DPO's outputs): one
warm-up step, then one profiled step; the table lists each kernel's calls, device time and share
of the step.  cuBLAS rows time the step's GEMM shapes alone (``X = H·Wᵀ``, ``dH = G·W``,
``dW = Gᵀ·H``, bf16 in, fp32 accumulation as the plans ask) so that a missed target can be placed:
the GEMMs' share against the fold's and the rest.  Off CUDA (the session's dry run) the same code
runs at toy sizes and times CPU operators instead of kernels.

Writes ``DIR/kernel_profile.json`` and ``DIR/kernel_profile.md``.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench import cases as cases_mod  # noqa: E402
from bench.inputs import make_inputs  # noqa: E402
from bench.methods import methods_for  # noqa: E402
from bench.reference import attach_reference, reference_pair_sums  # noqa: E402
from bench.timing import run_step  # noqa: E402

DEFAULT_METHODS = ("pyfused_module_linear", "pyfused_apply_dpo", "pyfused_linear", "trl_chunked_dpo")
TOP = 15  # kernels listed per method


def _device_time(evt, cuda):
    return (getattr(evt, "self_device_time_total", None) or evt.self_cuda_time_total) if cuda \
        else evt.self_cpu_time_total


def profile_step(fn, device):
    """``(rows, step_us)``: the step's kernels (CPU operators off CUDA) by self time, µs."""
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    rows = []
    for evt in prof.key_averages():
        t = _device_time(evt, cuda)
        if t and t > 0:
            rows.append(dict(kernel=evt.key[:120], calls=evt.count, us=round(float(t), 1)))
    rows.sort(key=lambda r: -r["us"])
    total = sum(r["us"] for r in rows)
    for r in rows:
        r["pct"] = round(100 * r["us"] / total, 1) if total else None
    return rows, round(total, 1)


def gemm_rows(case, device, reps=5):
    """cuBLAS at the plan's GEMM shapes: ``(name, shape, ms, TFLOP/s)`` per GEMM (CUDA events on
    a GPU, wall time off it)."""
    N, D, V = case.tokens, case.hidden, case.vocab
    dt = case.torch_dtype
    h, w = torch.randn(N, D, device=device, dtype=dt), torch.randn(V, D, device=device, dtype=dt)
    g = torch.randn(N, V, device=device, dtype=dt)
    shapes = {"X = H·Wᵀ [N,D]×[D,V]": lambda: h @ w.T, "dH = G·W [N,V]×[V,D]": lambda: g @ w,
              "dW = Gᵀ·H [V,N]×[N,D]": lambda: g.T @ h}
    out = []
    for name, fn in shapes.items():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            ms = start.elapsed_time(end) / reps
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            ms = 1e3 * (time.perf_counter() - t0) / reps
        out.append(dict(gemm=name, N=N, D=D, V=V, ms=round(ms, 3), tflops=round(2 * N * D * V / ms / 1e9, 1)))
    del h, w, g
    return out


def run(case, names, device):
    inputs = make_inputs(case, device)
    attach_reference(inputs, reference_pair_sums(case, inputs[0]))
    result = dict(case=case.key, device=str(device), methods={}, cublas=gemm_rows(case, device))
    for m in methods_for(case.path, names):
        reason = m.unavailable(device)
        if reason is not None:
            result["methods"][m.name] = dict(status=reason)
            continue
        try:
            loss_fn = m.build(case, device)
            run_step(loss_fn, inputs[0])  # warm-up: compilation and autotuning stay out of the table
            inputs[0].zero_grads()
            rows, total = profile_step(lambda: run_step(loss_fn, inputs[0]), device)
            inputs[0].zero_grads()
            result["methods"][m.name] = dict(status="ok", step_us=total, kernels=rows[:TOP], n_kernels=len(rows))
        except Exception as err:  # one method failing must not cost the others their table
            result["methods"][m.name] = dict(status=f"error: {type(err).__name__}: {str(err)[:200]}")
    return result


def markdown(results):
    unit = "device" if any(r["device"].startswith("cuda") for r in results) else "CPU (dry run)"
    out = [f"# Per-kernel profile of one step ({unit} self time)", ""]
    for res in results:
        out += [f"## {res['case']}", "", "cuBLAS at the step's GEMM shapes:", "",
                "| GEMM | ms | TFLOP/s |", "|---|---|---|"]
        out += [f"| {g['gemm']} | {g['ms']} | {g['tflops']} |" for g in res["cublas"]]
        for name, m in res["methods"].items():
            out += ["", f"### {name}: {m['status']}" + (f", step {m['step_us'] / 1e3:.3f} ms, "
                                                          f"{m['n_kernels']} kernels" if m["status"] == "ok" else "")]
            if m["status"] == "ok":
                out += ["", "| kernel | calls | µs | % of step |", "|---|---|---|---|"]
                out += [f"| `{r['kernel']}` | {r['calls']} | {r['us']} | {r['pct']} |" for r in m["kernels"]]
        out.append("")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--toy", action="store_true", help="CPU-sized cases (default off CUDA)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    toy = args.toy or device.type != "cuda"
    cases = cases_mod.session_cases("linear", toy=toy)
    # The headline (realistic inputs) with a trainable and a frozen head.
    picked = [c for c in cases if c.kind == "realistic" and c.vocab == cases[0].vocab
              and c.pairs == cases[0].pairs]
    names = [n for n in args.methods.split(",") if n]
    results = [run(c, names, device) for c in picked]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_profile.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "kernel_profile.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
