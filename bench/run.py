"""Benchmark runner: ``python bench/run.py`` (full sweep) or ``python bench/run.py --quick``.

On a CUDA machine it measures every method (peers included; missing ones are reported
as "not installed") and writes JSON, Markdown and PNG plots to
``bench/results/<gpu-name>/``, merged with what is already there.  Without CUDA it runs the
CPU form (``cpu_run``) at the real model's head shapes (SmolLM2-135M, V = 49,152, D = 576)
on its activations: pyfused_po's torch backend, eager PyTorch, TRL's CPU path and Liger,
timed (median, min–max) and with peak memory from each method's own process
(``bench/cpu_memory.py``), written to ``bench/results/cpu/``.
"""
import argparse
import json
import dataclasses
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    # Run as a script: import the suite as the ``bench`` package from the repository root,
    # and keep bench/ itself off sys.path so its module names shadow nothing.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import cases as cases_mod  # noqa: E402
from bench import max_context, real_inputs, roofline, work_counters  # noqa: E402
from bench.cpu_load import load_average, timing_warning  # noqa: E402
from bench.cpu_memory import measure_memory  # noqa: E402
from bench.env_info import environment, slug  # noqa: E402
from bench.measure import measure_case  # noqa: E402
from bench.methods import methods_for  # noqa: E402
from bench.plots import write_cpu_plots, write_plots  # noqa: E402
from bench.progress import progress  # noqa: E402
from bench.report_json import load_summary, merge_records, write_json  # noqa: E402
from bench.inputs import base_tensors  # noqa: E402
from bench.report_cpu import render_cpu  # noqa: E402
from bench.report_md import render  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# Where a run writes when no --out is given: a new folder per run, git-ignored, so the main job
# never overwrites the committed results (bench/results/<device>/ are written only on request).
LOCAL_RESULTS = RESULTS / "local"


def default_out_dir(env):
    """``bench/results/local/<device>-<UTC date and time>/``: new for every run."""
    stamp = env["date_utc"].replace(":", "").replace("+0000", "Z")
    return LOCAL_RESULTS / f"{slug(env['device'])}-{stamp}"


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short sweep (headline + V=128,256 bf16)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--paths", type=_csv(str), default=None, help="logits,linear")
    p.add_argument("--vocabs", type=_csv(int), default=None, help="e.g. 32000,128256")
    p.add_argument("--dtypes", type=_csv(str), default=None, help="bf16,fp32")
    p.add_argument("--kinds", type=_csv(str), default=None, help="random,realistic")
    p.add_argument("--methods", type=_csv(str), default=None, help="method names (default: all)")
    p.add_argument("--max-tokens-per-pair", type=int, default=None)
    p.add_argument("--headline-only", action="store_true", help="only the 16k x 128k bf16 cases")
    p.add_argument("--session", choices=cases_mod.PATHS, default=None,
                   help="the GPU session's cases of one path (cases.session_cases: headline, frozen head, "
                        "small batch, V=50,257; toy sizes off CUDA); results saved after every method")
    p.add_argument("--max-context", dest="max_context", action="store_true", default=None,
                   help="run the max-context search (default: on for the full GPU sweep)")
    p.add_argument("--no-max-context", dest="max_context", action="store_false")
    p.add_argument("--only-max-context", action="store_true", help="skip the sweep (GPU only)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", default=None,
                   help="results folder, merged into (default: a new bench/results/local/<device>-<time>/; "
                        "the committed results are bench/results/<device>/, written only when named here)")
    p.add_argument("--fresh", action="store_true", help="replace, not merge with, existing results")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plots", action="store_true", help="write JSON and Markdown only (a later run plots)")
    p.add_argument("--toy", action="store_true",
                   help="CPU only: tiny random shapes instead of the real model's (the runner's tests)")
    p.add_argument("--no-memory", action="store_true", help="CPU only: skip the per-process peak-memory probe")
    p.add_argument("--cpu-pairs", type=int, default=cases_mod.CPU_PAIRS,
                   help="CPU only: pairs per batch (real inputs: at most the shipped pairs)")
    p.add_argument("--cpu-seq-len", type=int, default=cases_mod.CPU_SEQ, help="CPU only: tokens per sequence")
    return p.parse_args(argv)


def pick_cases(args, device):
    if args.only_max_context:
        return []
    if args.session is not None:
        sweep = cases_mod.session_cases(args.session, toy=device.type != "cuda")
    elif device.type != "cuda":
        sweep = (cases_mod.toy_cpu_cases() if args.toy
                 else cases_mod.cpu_cases(pairs=args.cpu_pairs, seq_len=args.cpu_seq_len))
    elif args.headline_only:
        sweep = cases_mod.headline_cases()
    else:
        sweep = cases_mod.quick_cases() if args.quick else cases_mod.full_cases()
    return cases_mod.select(sweep, paths=args.paths, vocabs=args.vocabs, dtypes=args.dtypes,
                            kinds=args.kinds, max_tokens_per_pair=args.max_tokens_per_pair)


def sweep(cases, args, device, roof, tensors=None, on_record=None):
    """Records of every method on every case; ``tensors``: prepared inputs by case key;
    ``on_record(records so far)`` after each measured method."""
    names = args.methods
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    reps = args.reps if args.reps is not None else (5 if args.quick else 10)
    records = []
    bar = progress(len(cases), "bench", enabled=not args.no_progress)
    for case in cases:
        bar.set_postfix_str(case.key)
        partial = []

        def note(rec):
            partial.append(rec)
            on_record(records + partial)

        records += measure_case(case, methods_for(case.path, names), device, roof, warmup=warmup, reps=reps,
                                tensors=(tensors or {}).get(case.key), on_record=None if on_record is None else note)
        bar.update()
    bar.close()
    return records


def run_max_context(args, device):
    names = args.methods
    methods = [m for path in cases_mod.PATHS for m in methods_for(path, names)]
    bar = progress(len(methods), "max context", enabled=not args.no_progress)
    out = []
    for m in methods:
        bar.set_postfix_str(m.name)
        out.append(max_context.max_context(m, device))
        bar.update()
    bar.close()
    return out


def _is_cuda(summary):
    return summary["environment"].get("device_type") == "cuda"


def render_any(summary):
    return render(summary) if _is_cuda(summary) else render_cpu(summary)


def save(out_dir, summary, fresh, base=None, plots=True):
    """Writes ``summary`` merged with ``base`` (default: what ``out_dir`` holds now; a run that saves
    as it goes passes what it held before the run, so no record or run stamp is merged twice).
    ``plots=False``: JSON and Markdown only (the saves after each method; the run's last save plots)."""
    old = None if fresh else (load_summary(out_dir) if base is None else base)
    if old is not None:
        summary["records"] = merge_records(old["records"], summary["records"])
        mc_new = {e["method"] for e in summary["max_context"]}
        summary["max_context"] = [e for e in old.get("max_context", []) if e["method"] not in mc_new] \
            + summary["max_context"]
        summary["runs"] = old.get("runs", []) + summary["runs"]
        summary["roofline"] = summary["roofline"] or old.get("roofline")
        summary["environment"] = {**summary["environment"], "merged_runs": len(summary["runs"])}
    paths = write_json(out_dir, summary)
    md = Path(out_dir) / "README.md"
    md.write_text(render_any(summary))
    if not plots:
        return paths + [md]
    plot = write_plots if _is_cuda(summary) else write_cpu_plots
    pngs = plot(summary["records"], Path(out_dir) / "plots")
    return paths + [md] + pngs


def cpu_inputs(cases):
    """Step 1 of the CPU form: each case's base tensors, from the real model when it is
    installed, else a random draw at the same shapes (``kind`` says which) and a note."""
    notes, tensors, out = [], {}, []
    reason = real_inputs.unavailable_reason() if any(c.kind == "smollm2" for c in cases) else None
    if reason is not None:
        notes.append(f"real model unavailable ({reason}): random inputs at its shapes instead")
        print("note: " + notes[-1])
    for case in cases:
        if case.kind == "smollm2" and reason is not None:
            case = dataclasses.replace(case, kind="random")
        tensors[case.key] = (real_inputs.case_tensors(case) if case.kind == "smollm2"
                             else base_tensors(case, torch.device("cpu")))
        out.append(case)
    return out, tensors, notes


def merge_base(args, out_dir):
    """What a ``--session`` run merges into, read once before it starts (its own saves after each
    method must not be merged again); ``None`` otherwise (``save`` reads the folder then)."""
    if args.session is None:
        return None
    return (None if args.fresh else load_summary(out_dir)) or {"records": [], "runs": [], "max_context": []}


def checkpointer(args, out_dir, summary, base):
    """``on_record`` for :func:`sweep` under ``--session``: the records so far are saved, merged
    with ``base``, after every method; else ``None``."""
    if args.session is None:
        return None

    def checkpoint(records):
        save(out_dir, dict(summary, records=list(records), runs=list(summary["runs"])), args.fresh, base=base,
             plots=False)
        print(f"saved {len(records)} records to {out_dir}", flush=True)
    return checkpoint


def cpu_run(args, env, cases, out_dir=None, base=None):
    """The CPU form as a sequence of steps; each adds to ``summary``."""
    cpu = torch.device("cpu")
    summary = {"environment": env, "roofline": {}, "records": [], "max_context": [], "runs": [env]}
    # 1. inputs: the real model's activations at its head shapes (or random, noted)
    cases, tensors, summary["notes"] = cpu_inputs(cases)
    # 2. value check against a float64 reference, then timings (median, min–max of the reps),
    #    with the machine's load at both ends: a busy machine's timings are flagged, not trusted
    summary["records"] = sweep(cases, args, cpu, {}, tensors, on_record=checkpointer(args, out_dir, summary, base))
    env["load_average_end"] = load_average()
    loads = [x[0] for x in (env.get("load_average"), env["load_average_end"]) if x]
    summary["timing_warning"] = timing_warning(loads or None, env.get("cpu_cores"), env.get("cpu_threads"))
    if summary["timing_warning"]:
        print("warning: " + summary["timing_warning"], flush=True)
    # 3. peak memory: each method's own fresh process, above a baseline process
    if not args.no_memory:
        print("memory: one fresh process per method and a baseline per case ...", flush=True)
        measure_memory([(c, [r for r in summary["records"] if r["case"] == c.key], tensors[c.key]) for c in cases])
    # 4. work by construction: GEMMs, peak live bytes, accumulator traffic vs TRL 1.16 / Liger (one DPO step)
    if args.quick:
        work_counters.main(["--no-save"] + (["--seq", "64", "--vocab", "2048"] if args.toy else []))
    return summary


def _is_gpu_run(summary_path):
    """A results folder written by a CUDA run (CPU runs and the CPU-only studies beside them —
    work counters, static profile, grad filter, packed — are not GPU results)."""
    try:
        env = json.loads(Path(summary_path).read_text()).get("environment", {})
    except (OSError, ValueError):
        return False
    return env.get("device_type") == "cuda" and (Path(summary_path).parent / "README.md").is_file()


def _pointers(out_dir):
    """Where to read further: result folders that exist (never a placeholder path)."""
    gpu = sorted(p.parent for p in RESULTS.glob("*/summary.json") if _is_gpu_run(p))
    lines = [f"CPU results: {Path(out_dir) / 'README.md'}"] if out_dir is not None else []
    committed = RESULTS / "cpu" / "README.md"
    if committed.is_file() and (out_dir is None or Path(out_dir).resolve() != committed.parent.resolve()):
        lines.append(f"Committed CPU results (a quiet machine): {committed}")
    if gpu:
        lines.append("GPU results: " + ", ".join(str(p / "README.md") for p in gpu))
    else:
        lines.append(f"GPU results: none committed yet ({RESULTS / 'README.md'})")
    return lines


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        os.environ.pop("TRITON_INTERPRET", None)
    env = environment(device, ["python", "bench/run.py"] + list(argv if argv is not None else sys.argv[1:]))
    cases = pick_cases(args, device)
    out_dir = Path(args.out) if args.out else default_out_dir(env)
    base = merge_base(args, out_dir)
    if device.type != "cuda":
        summary = cpu_run(args, env, cases, out_dir, base)
    else:
        roof = roofline.measure(device)
        summary = {"environment": env, "roofline": roof, "records": [], "max_context": [], "runs": [env]}
        summary["records"] = sweep(cases, args, device, roof, on_record=checkpointer(args, out_dir, summary, base))
        want_mc = args.only_max_context or (args.max_context if args.max_context is not None
                                            else not (args.quick or args.headline_only))
        if want_mc:
            summary["max_context"] = run_max_context(args, device)
    print(render_any(summary))
    for p in save(out_dir, summary, args.fresh, base=base, plots=not args.no_plots):
        print(f"wrote {p}")
    if device.type != "cuda":
        print("\n".join(_pointers(out_dir)))
    return summary


if __name__ == "__main__":
    main()
