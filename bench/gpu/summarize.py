"""The GPU session's bookkeeping (``bench/gpu/session.sh``): environment stamp, step records, summary.

    python bench/gpu/summarize.py env RESULTS_DIR           # session_env.json: device, commit, peers
    python bench/gpu/summarize.py step RESULTS_DIR NAME STATUS RC WALL BUDGET TIMEOUT LOG SINCE [EXPECT...]
    python bench/gpu/summarize.py summary RESULTS_DIR OUT    # SUMMARY.md + session.json (+ copies) in OUT

``step`` appends one record to ``steps.jsonl``; a step whose command succeeded but left one of
its expected files missing, empty or older than the step is recorded as ``failed: wrote nothing``.  ``summary``
writes the step table (status, wall time, budget) and the numbers the issue's targets are
judged by (headline ratios, % of the HBM floor and of cuBLAS, max context, ablations), read
from the files the steps wrote; it exits 1 when any step is not ``ok`` or ``skipped: <reason>``.
Only ``env`` imports torch.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

PEERS = (("trl", "trl"), ("liger_kernel", "liger-kernel"), ("cut_cross_entropy", "cut-cross-entropy"))
STEPS = "steps.jsonl"
CARRY_LIMIT = 64 * 2**20  # the device tool's limit on what travels (working tree + carried paths)


def _fine(status):
    """A step counts as done when it ran ok or was skipped for a recorded reason (a missing
    binary); "not run: no time left" is a failure of the plan, so it is not fine."""
    return status == "ok" or status.startswith("skipped")


def _git(*args):
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def env(res):
    """Device, date, commit (``$COMMIT`` wins: the device machine's copy may have no .git) and
    whether each peer imports, before the long steps run."""
    import datetime
    import importlib
    import importlib.metadata

    import torch

    info = dict(date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=os.environ.get("COMMIT") or _git("rev-parse", "HEAD") or "unknown",
                dirty_files=None if _git("rev-parse", "HEAD") is None else len((_git("status", "--porcelain") or "").splitlines()),
                dry_run=os.environ.get("DRY_RUN", "0") not in ("", "0"),
                torch=torch.__version__, cuda=torch.version.cuda,
                device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run)")
    peers = {}
    for module, dist in PEERS:
        try:
            importlib.import_module(module)
            peers[dist] = importlib.metadata.version(dist)
        except Exception as err:  # missing or broken: the headline reports it per method too
            peers[dist] = f"unavailable: {type(err).__name__}: {str(err)[:120]}"
    fa = Path(__file__).resolve().parents[2] / ".whl" / "flash_attn_ce" / "flash_attn" / "ops" / "triton"
    peers["flash-attn (Triton CE file)"] = "present" if (fa / "cross_entropy.py").is_file() else "absent"
    info["peers"] = peers
    info["travel_bytes"] = travel_bytes()
    Path(res).mkdir(parents=True, exist_ok=True)
    (Path(res) / "session_env.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))
    if info["dry_run"] and info["travel_bytes"] and info["travel_bytes"] > CARRY_LIMIT:
        raise SystemExit(f"the working tree plus .whl is {info['travel_bytes'] / 2**20:.1f} MiB: over the device "
                         f"tool's {CARRY_LIMIT / 2**20:.0f} MiB; trim .whl")


def travel_bytes():
    """Bytes the device call would send: tracked and untracked-not-ignored files plus ``.whl``
    (``None`` without git, as on the device machine's copy)."""
    root = Path(__file__).resolve().parents[2]
    listed = _git("-C", str(root), "ls-files", "-co", "--exclude-standard")
    if listed is None:
        return None
    files = [root / f for f in listed.splitlines()] + list((root / ".whl").rglob("*"))
    return sum(f.stat().st_size for f in files if f.is_file() and not f.is_symlink())


def _fresh(path, since):
    p = Path(path)
    return p.is_file() and p.stat().st_size > 0 and p.stat().st_mtime >= since


def step(res, name, status, rc, wall, budget, timeout, log, since, *expect):
    """``expect``: files the step must have written (non-empty, modified since ``since``, an
    epoch time: a file an earlier step wrote does not count)."""
    missing = [e for e in expect if not _fresh(e, float(since) - 1)]
    if status == "ok" and missing:
        status = "failed: wrote nothing"
    rec = dict(step=name, status=status, rc=int(rc), wall_s=round(float(wall), 1), budget_s=int(budget),
               timeout_s=int(timeout), log=os.path.relpath(log, res), missing=missing)
    with open(Path(res) / STEPS, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"[session] {name}: {status} ({rec['wall_s']} s of {budget} s)" + (f"; missing {missing}" if missing else ""))


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _ms(r):
    return None if r is None or r.get("time_s") is None else 1e3 * r["time_s"]


def _f(v, spec="{:.3g}"):
    return "—" if v is None else spec.format(v)


def headline_lines(summary):
    """Headline rows per (case, method) and the ratios the targets are stated in."""
    if not summary:
        return ["(no headline summary.json)"], {}
    recs = [r for r in summary.get("records", []) if r.get("headline")] or summary.get("records", [])
    by = {(r["case"], r["method"]): r for r in recs}
    lines = ["| case | method | status | fwd+bwd ms | peak extra GB | peak / input bytes | score % | loss ok |",
             "|---|---|---|---|---|---|---|---|"]
    for r in recs:
        peak = r.get("peak_extra_bytes")
        lines.append(f"| {r['case']} | {r['method']} | {r['status']} | {_f(_ms(r))} | {_f(peak and peak / 1e9)} "
                     f"| {_f(peak and 100 * peak / r['input_bytes'], '{:.1f}%')} | {_f(r.get('score_pct'), '{:.1f}')} "
                     f"| {r.get('agrees')} |")
    ratios = {}
    for case in sorted({c for c, _ in by}):
        if case.startswith("linear"):
            # What users run against what TRL users run: the module's default plan and apply(DPOTrainer)'s
            # head against TRL with DPOTrainer's outputs; the staged and fused impls against plain TRL.
            for m, base in (("pyfused_module_linear", "trl_chunked_dpo"), ("pyfused_apply_dpo", "trl_chunked_dpo"),
                            ("pyfused_linear", "trl_chunked"), ("pyfused_linear_fused", "trl_chunked")):
                r, trl = by.get((case, m)), by.get((case, base))
                label = "TRL chunked" + (" (DPO outputs)" if base == "trl_chunked_dpo" else "")
                if r and trl and _ms(r) and _ms(trl):
                    ratios[f"{case}: {m} time / {label} (target ≤ 0.8)"] = _ms(r) / _ms(trl)
                    if r.get("peak_extra_bytes") and trl.get("peak_extra_bytes"):
                        ratios[f"{case}: {m} peak / {label} (target ≤ 1)"] = \
                            r["peak_extra_bytes"] / trl["peak_extra_bytes"]
                if r and r.get("score_pct") is not None:
                    ratios[f"{case}: {m} % of cuBLAS bf16 (target ≥ 70)"] = r["score_pct"]
        else:
            for m in ("pyfused", "pyfused_inplace"):
                r = by.get((case, m))
                if r and r.get("score_pct") is not None:
                    ratios[f"{case}: {m} % of HBM floor (target ≥ 85)"] = r["score_pct"]
                if r and r.get("peak_extra_bytes") is not None:
                    extra = r["peak_extra_bytes"] / r["input_bytes"] - (0 if m == "pyfused_inplace" else 1)
                    ratios[f"{case}: {m} extra peak beyond the gradient / logits bytes (target ≤ 1%)"] = 100 * extra
    return lines, ratios


def summary(res, out):
    res, out = Path(res), Path(out)
    steps = []
    if (res / STEPS).is_file():
        steps = [json.loads(line) for line in (res / STEPS).read_text().splitlines() if line.strip()]
    env_info = _load(res / "session_env.json") or {}
    head = _load(res / "summary.json")
    ctx = _load(res / "max-context-80GB" / "summary.json")
    abl = _load(res / "ablations" / "ablations.json")
    lines = [f"# GPU session — {env_info.get('device', '?')}", "",
             f"date {env_info.get('date_utc', '?')}, commit `{env_info.get('commit', '?')}`"
             + (" — **DRY RUN on the CPU: toy sizes, no GPU numbers**" if env_info.get("dry_run") else ""), "",
             "## Steps", "", "| step | status | wall s | budget s | log |", "|---|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {s['step']} | {s['status']} | {s['wall_s']} | {s['budget_s']} | {s['log']} |")
    lines += ["", f"total wall {sum(s['wall_s'] for s in steps):.0f} s", "", "## Peers", ""]
    lines += [f"- {k}: {v}" for k, v in env_info.get("peers", {}).items()]
    hl, ratios = headline_lines(head)
    lines += ["", "## Headline ratios", ""] + ([f"- {k}: {v:.3g}" for k, v in ratios.items()] or ["(none)"])
    lines += ["", "## Headline records", ""] + hl
    lines += ["", "## Max context (allocator capped at 80 GB; target 262,144 tokens per pair)", ""]
    for e in (ctx or {}).get("max_context", []):
        cap = "≥ " if e.get("capped") else ""
        lines.append(f"- {e['method']}: {cap}{e.get('max_tokens_per_pair')} ({e.get('status')}) {e.get('note', '')}")
    if not (ctx or {}).get("max_context"):
        lines.append("(no max-context results)")
    lines += ["", "## Ablations", "", "see ablations.md" if abl else "(no ablations.json)", ""]
    kp = res / "kernel_profile" / "kernel_profile.md"
    lines += ["## Per-kernel profile of one step", "", "see kernel_profile.md" if kp.is_file()
              else "(no kernel_profile.md)", ""]
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (res / "SESSION.md").write_text(text)
    (out / "SUMMARY.md").write_text(text)
    doc = dict(environment=env_info, steps=steps, headline_ratios=ratios,
               max_context=(ctx or {}).get("max_context", []))
    (res / "session.json").write_text(json.dumps(doc, indent=1))
    (out / "session.json").write_text(json.dumps(doc, indent=1))
    for src, dst in ((res / "README.md", "headline.md"), (res / "ablations" / "ablations.md", "ablations.md"),
                     (res / "ablations" / "ablations.png", "ablations.png"),
                     (res / "kernel_profile" / "kernel_profile.md", "kernel_profile.md")):
        if src.is_file():
            shutil.copyfile(src, out / dst)
    bad = [s["step"] for s in steps if not _fine(s["status"])]
    print(text)
    if bad:
        print(f"[session] steps not ok: {bad}", file=sys.stderr)
        return 1
    return 0


def main(argv):
    if not argv:
        raise SystemExit(__doc__)
    cmd, rest = argv[0], argv[1:]
    if cmd == "env":
        env(*rest)
        return 0
    if cmd == "step":
        step(*rest)
        return 0
    if cmd == "summary":
        return summary(*rest)
    raise SystemExit(f"unknown command {cmd!r}: env | step | summary")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
