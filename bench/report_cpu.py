"""Markdown for a CPU run: what CPU numbers do and do not tell, then one table per case
(time median and min–max, peak memory from the process high-water mark, loss agreement)."""
from .report_md import REFERENCE_METHOD

CAVEATS = """\
**What these CPU numbers tell.** (1) Whether every method computes the same DPO loss
(checked against a float64 reference). (2) How much extra memory one forward + backward
of each method allocates at the real model's head shapes: the process high-water mark
(RSS) of a fresh process per method, minus that of a process that only holds the inputs.
On the CPU that is the algorithm's allocations: which `[tokens, vocab]` buffers (logits,
fp32 copies, gradient, chunks) exist at the same time. The same algorithm allocates in the
same proportion on a GPU; the absolute GPU figure also depends on its allocator,
workspaces and the input dtype (bf16 there, fp32 here).

**What they do not tell.** Anything about GPU speed. Here pyfused_po runs its chunked
PyTorch backend (not its Triton kernels), TRL its torch fold of the Triton kernel, Liger
without `torch.compile`; on a GPU the kernels, memory bandwidth and launch overheads
decide, and the order of the methods can change. CPU times also move with the machine's
load (the load average is in the stamp): compare methods within one run, by the median,
and read the min–max spread before trusting a difference."""


def _ms(s):
    return "—" if s is None else f"{s * 1e3:,.0f} ms" if s >= 0.1 else f"{s * 1e3:.3g} ms"


def _mb(b):
    return "—" if b is None else f"{b / 1e6:,.1f} MB"


def _check(r):
    if r["agrees"] is None:
        return "n/c"
    return "✓" if r["agrees"] else "✗"


def _ref_note(r):
    if r["reference_loss"] is None:
        return ""
    return f"{r['loss']:.6f} vs {r['reference_loss']:.6f}" + (" (ref = 0)" if r.get("reference_free") else "")


def case_table(rows):
    """One case: a row per method."""
    path = rows[0]["path"]
    ref = next((r for r in rows if r["method"] == REFERENCE_METHOD[path] and r["status"] == "ok"), None)
    out = ["| method | fwd+bwd (median) | min – max (reps) | peak extra memory | steady step | "
           "peak / input bytes | memory vs pyfused_po | loss vs float64 reference | abs. error | check |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['label']} | {r['status']} | | | | | | | | |")
            continue
        t = r["times_s"]
        spread = f"{_ms(min(t))} – {_ms(max(t))} ({len(t)})" if t else "—"
        mem = r["peak_extra_bytes"]
        frac = None if mem is None else 100.0 * mem / r["input_bytes"]
        ratio = None
        if ref is not None and mem is not None and ref["peak_extra_bytes"]:
            ratio = mem / ref["peak_extra_bytes"]
        mem_cell = _mb(mem) if mem is not None else (r.get("memory_note") or "not measured")
        err = "—" if r["loss_error"] is None else f"{r['loss_error']:.1e}"
        step = _mb(r.get("peak_extra_step_bytes"))
        out.append(f"| {r['label']} | {_ms(r['time_s'])} | {spread} | {mem_cell} | {step} | "
                   f"{'—' if frac is None else f'{frac:.0f}%'} | {'—' if ratio is None else f'{ratio:.2f}×'} | "
                   f"{_ref_note(r)} | {err} | {_check(r)} |")
    return "\n".join(out)


COLUMNS = """\
Columns: **fwd+bwd** median of the timed reps (`time.perf_counter` around one forward +
backward, after warm-up) and **min – max** over them. **Peak extra memory**: the
high-water mark of the method's own fresh process (a warm-up step, then the measured
step) minus that of a baseline process that only holds the inputs; it includes the
gradients the step produces (on the linear path a weight-sized gradient for every method)
and anything the first call leaves behind. **Steady step**: the measured step alone, the
mark reset just before it, minus the resident memory then (what every later step of a
training loop peaks at). **Peak / input bytes**: peak extra over the differentiable
inputs' bytes. **Loss**: the method's loss and the float64 reference's (Liger takes no
reference log-probs: checked with reference 0). MB = 10⁶ bytes. More: bench/README.md."""


def _inputs_line(rows, notes):
    r = rows[0]
    shape = (f"{r['pairs']} pairs × {r['seq_len']} tokens per sequence = {r['tokens']:,} token rows, "
             f"V = {r['vocab']:,}" + (f", D = {r['hidden']}" if r["path"] == "linear" else "") + f", {r['dtype']}")
    if r["kind"] == "smollm2":
        what = ("SmolLM2-135M-Instruct's final hidden states and tied head on the shipped preference pairs "
                "(each row's last tokens before the end of turn, labels = the next token)")
        if r["path"] == "logits":
            what += "; logits = hidden @ headᵀ"
    else:
        what = f"{r['kind']} synthetic inputs" + (" (" + "; ".join(notes) + ")" if notes else "")
    input_mb = r["input_bytes"] / 1e6
    return f"{shape}; {what}. Differentiable input bytes: {input_mb:,.1f} MB."


def render_cpu(summary):
    """The whole Markdown report of a CPU run."""
    records, notes = summary["records"], summary.get("notes", [])
    parts = ["# pyfused_po benchmark results: CPU", "", CAVEATS, "", _cpu_stamp(summary["environment"]), ""]
    if summary.get("timing_warning"):
        parts += [f"**Timings not meaningful:** {summary['timing_warning']}.", ""]
    for note in notes:
        parts.append(f"**Note:** {note}\n")
    for key in dict.fromkeys(r["case"] for r in records):
        rows = [r for r in records if r["case"] == key]
        parts += [f"## {rows[0]['path']} path: `{key}`", "", _inputs_line(rows, notes), "", case_table(rows), ""]
    ok = [r for r in records if r["status"] == "ok"]
    agree = sum(1 for r in ok if r["agrees"])
    parts.append(f"Loss check: {agree} of {len(ok)} measured methods agree with the float64 reference"
                 + ("" if agree == len(ok) else " (**see ✗ rows**)") + ".\n")
    parts.append(COLUMNS)
    return "\n".join(parts) + "\n"


def _cpu_stamp(env):
    libs = ", ".join(f"{k} {v}" for k, v in env.get("libraries", {}).items() if v)
    load, end = env.get("load_average"), env.get("load_average_end")
    lines = [f"- device: **{env.get('device')}**, {env.get('cpu_cores', '?')} cores, "
             f"{env.get('cpu_threads', '?')} torch threads"
             + (f", load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) at the start"
                if load else "")
             + (f", {end[0]:.1f} (1 min) at the end of the timings" if end else ""),
             f"- date: {env.get('date_utc')}; command: `{env.get('command')}`; commit {env.get('git_commit')}",
             f"- libraries: {libs}"]
    return "\n".join(lines)

