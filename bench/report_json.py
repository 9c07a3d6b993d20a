"""Result files in JSON: a pytest-benchmark-compatible file and the suite's summary.

* ``pytest_benchmark.json`` has pytest-benchmark's layout (``machine_info``,
  ``commit_info``, ``benchmarks[*].stats`` with its field names, seconds), so
  ``pytest-benchmark compare`` and tools reading its files can load the runner's timings.
  Only measured (``status == "ok"``) records appear there.
* ``summary.json`` holds every record (including OOM / not installed), the roofline
  measurements, the max-context results and the environment stamp.
"""
import json
import statistics
from pathlib import Path

SUMMARY = "summary.json"
PYTEST_BENCHMARK = "pytest_benchmark.json"


def _quartiles(data):
    if len(data) < 2:
        return data[0], data[0]
    q = statistics.quantiles(data, n=4, method="inclusive")
    return q[0], q[2]


def benchmark_stats(times):
    """pytest-benchmark's ``Stats`` fields computed from per-rep seconds."""
    data = sorted(times)
    mean = statistics.mean(data)
    stddev = statistics.stdev(data) if len(data) > 1 else 0.0
    q1, q3 = _quartiles(data)
    iqr = q3 - q1
    lo_fence, hi_fence = q1 - 1.5 * iqr, q3 + 1.5 * iqr
    inside = [x for x in data if lo_fence <= x <= hi_fence] or data
    iqr_out = sum(1 for x in data if x < lo_fence or x > hi_fence)
    sd_out = sum(1 for x in data if abs(x - mean) > stddev) if stddev else 0
    return {
        "min": data[0], "max": data[-1], "mean": mean, "stddev": stddev, "rounds": len(data),
        "median": statistics.median(data), "iqr": iqr, "q1": q1, "q3": q3,
        "iqr_outliers": iqr_out, "stddev_outliers": sd_out, "outliers": f"{sd_out};{iqr_out}",
        "ld15iqr": inside[0], "hd15iqr": inside[-1], "ops": 1.0 / mean if mean else 0.0,
        "total": sum(data), "data": list(times), "iterations": 1,
    }


def pytest_benchmark_document(records, env):
    benchmarks = []
    for r in records:
        if r["status"] != "ok" or not r["times_s"]:
            continue
        name = f"{r['method']}[{r['case']}]"
        benchmarks.append({
            "group": r["case"], "name": name, "fullname": f"bench/run.py::{name}",
            "params": {"method": r["method"], "case": r["case"]}, "param": r["case"],
            "extra_info": {k: r[k] for k in ("peak_extra_bytes", "score_pct", "loss", "agrees",
                                             "tokens", "tokens_per_pair", "vocab", "dtype", "path")},
            "options": {"timer": "cuda events" if env.get("device_type") == "cuda" else "perf_counter",
                        "disable_gc": False, "min_rounds": len(r["times_s"]), "warmup": True},
            "stats": benchmark_stats(r["times_s"]),
        })
    return {
        "machine_info": {"node": env.get("device"), "machine": env.get("platform"),
                         "python_version": env.get("python"), "gpu": env.get("device"),
                         "driver": env.get("driver"), "cuda": env.get("cuda"),
                         "libraries": env.get("libraries")},
        "commit_info": {"id": env.get("git_commit"), "project": "pyfused_po"},
        "benchmarks": benchmarks,
        "datetime": env.get("date_utc"),
        "version": env.get("libraries", {}).get("pytest-benchmark") or "5.0.0",
    }


def merge_records(old, new):
    """``old`` records with those of the same (method, case) replaced by ``new``."""
    fresh = {(r["method"], r["case"]) for r in new}
    return [r for r in old if (r["method"], r["case"]) not in fresh] + list(new)


def load_summary(out_dir):
    path = Path(out_dir) / SUMMARY
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def write_json(out_dir, summary):
    """Writes both JSON files; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / SUMMARY, out / PYTEST_BENCHMARK]
    with open(paths[0], "w") as f:
        json.dump(summary, f, indent=1)
    with open(paths[1], "w") as f:
        json.dump(pytest_benchmark_document(summary["records"], summary["environment"]), f, indent=1)
    return paths
