"""What the real-model examples (``examples/*_smollm2.py``) share: one subprocess per run, so
that each run's peak resident memory is its own; the run's CPU time and memory; ``--runs``;
and the JSON + PNG they write."""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def peak_rss_mb():
    """This process's resident-memory high-water mark (``getrusage``'s ``ru_maxrss``), MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KB on Linux


def cpu_s():
    """CPU seconds this process has used, all threads (on a shared machine a steadier
    measure of work than wall time)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def add_run_arguments(parser, script, runs, default_runs, stem):
    """``--out`` (default: ``output/`` beside ``script``), ``--runs`` and the hidden ``--worker`` /
    ``--result`` of a worker subprocess."""
    parser.add_argument("--out", default=str(Path(script).with_name("output")),
                        help=f"folder for {stem}.json and {stem}.png (default examples/output)")
    parser.add_argument("--runs", default=",".join(default_runs), help=f"comma-separated subset of {','.join(runs)}")
    parser.add_argument("--worker", choices=list(runs), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)


def selected_runs(parser, args, runs):
    """The run names of ``--runs`` in order (a parser error names any unknown one); exits naming
    the install command when the real model is missing."""
    names = [m.strip() for m in args.runs.split(",") if m.strip()]
    unknown = sorted(set(names) - set(runs))
    if unknown or not names:
        parser.error(f"--runs: unknown {unknown or names}; choose from {list(runs)}")
    from . import smollm2

    reason = smollm2.unavailable_reason()
    if reason is not None:
        sys.exit(f"error: {reason}")
    return names


def run_each(script, names, runs, worker_argv):
    """Run ``script --worker NAME --result FILE *worker_argv`` per name; their JSON results."""
    results = []
    for name in names:
        print(f"[{name}] {runs[name]} ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
            # On a CPU the Triton interpreter is a debugging tool, far too slow to train with:
            # pyfused_po's "auto" backend then picks its chunked PyTorch backend.
            env.pop("TRITON_INTERPRET", None)
            cmd = [sys.executable, str(script), "--worker", name, "--result", str(result), *map(str, worker_argv)]
            subprocess.run(cmd, env=env, check=True)
            results.append(json.loads(result.read_text()))
    return results


def save(results, out, stem, plot):
    """``out/stem.json`` and ``plot(out/stem.png)``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    plot(out / f"{stem}.png")
    print(f"\nwrote {out / f'{stem}.json'} and {out / f'{stem}.png'}")
