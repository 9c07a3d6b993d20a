"""Peak memory per method on the CPU, from the process high-water mark (RSS).

``torch.cuda.max_memory_allocated`` has no CPU counterpart, so each method runs one
forward + backward in a fresh process of its own and the kernel's record of that
process's peak resident set (``VmHWM``) is read:

* ``peak_extra_bytes`` = the method's process high-water mark − the high-water mark of a
  **baseline** process that does everything the same (imports, loads the inputs into
  leaves) except the step.  Like the GPU column it counts the step's temporaries plus the
  gradients it produces.
  The method's process runs a warm-up step before the measured one, so this also counts
  what the first call leaves behind (lazy imports, caches).
* ``peak_extra_step_bytes``: the measured step alone, inside the method's process: the
  mark reset (``/proc/self/clear_refs``) just before it, its mark − the RSS then.  This is
  the steady-state step of a training loop; the two agree unless the first call left
  memory behind.

Both processes are forked from one server process (``bench/cpu_memory_server.py``)
started fresh for the run, with glibc's ``malloc`` told to serve every block of 64 KiB or
more with ``mmap`` (``MALLOC_MMAP_THRESHOLD_``): a freed tensor then leaves the resident
set at once, so the mark follows the live tensors instead of the allocator's caching.
What this measures is the algorithm's allocations on the CPU; a GPU's caching allocator,
workspaces and kernels differ, so it predicts GPU memory only in proportion.
"""
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
PROTOCOL = ("process RSS high-water mark (VmHWM), one fresh forked process per method (warm-up step, "
            "then the measured step), minus a baseline process that only loads the inputs; "
            "glibc malloc mmap threshold 64 KiB")


def _server_env():
    env = dict(os.environ, **MALLOC_ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_server(jobs, *, timeout=600):
    """Raw results of one server subprocess for ``jobs`` = ``[(case, method_names, tensors)]``:
    a list of ``{"baseline": {...}, name: {...}}`` in the same order."""
    with tempfile.TemporaryDirectory(prefix="pyfused_bench_mem_") as tmp:
        spec = {"jobs": [], "out": os.path.join(tmp, "out.json")}
        for j, (case, names, tensors) in enumerate(jobs):
            path = os.path.join(tmp, f"tensors{j}.pt")
            torch.save({k: v.detach().contiguous() for k, v in tensors.items()}, path)
            spec["jobs"].append({"case": dataclasses.asdict(case), "methods": list(names), "tensors": path})
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        proc = subprocess.run([sys.executable, "-m", "bench.cpu_memory_server", spec_path], cwd=ROOT,
                              env=_server_env(), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(spec["out"]):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"memory server failed (exit {proc.returncode}): {tail[0][:300]}")
        with open(spec["out"]) as f:
            return json.load(f)


def apply_results(records, results):
    """Fills ``peak_extra_bytes`` (and the in-process cross-check) into ``ok`` records."""
    base = results["baseline"]
    for rec in records:
        res = results.get(rec["method"])
        if rec["status"] != "ok" or res is None:
            continue
        if base.get("status") != "ok" or res.get("status") != "ok":
            rec["memory_note"] = res.get("note") or base.get("note") or "memory probe failed"
            continue
        rec["peak_extra_bytes"] = res["hwm_bytes"] - base["hwm_bytes"]
        rec["rss_hwm_bytes"], rec["rss_baseline_hwm_bytes"] = res["hwm_bytes"], base["hwm_bytes"]
        if res.get("step_hwm_bytes") is not None:
            rec["peak_extra_step_bytes"] = res["step_hwm_bytes"] - res["rss_before_step_bytes"]
        rec["memory_protocol"] = PROTOCOL
    return records


def measure_memory(jobs, *, timeout=900):
    """Peak memory of every measured (``ok``) method, written into its record.

    ``jobs``: ``[(case, records of that case, base tensors)]``; the tensors (as
    ``bench.inputs.make_inputs`` takes them) reach the subprocesses through temporary files.
    """
    jobs = [(case, recs, tensors) for case, recs, tensors in jobs if any(r["status"] == "ok" for r in recs)]
    if not jobs:
        return
    try:
        results = run_server([(case, [r["method"] for r in recs if r["status"] == "ok"], tensors)
                              for case, recs, tensors in jobs], timeout=timeout)
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as err:
        for _, recs, _ in jobs:
            for rec in recs:
                if rec["status"] == "ok":
                    rec["memory_note"] = f"{type(err).__name__}: {str(err)[:200]}"
        return
    for (_, recs, _), res in zip(jobs, results):
        apply_results(recs, res)
