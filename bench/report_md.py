"""Markdown tables from a summary: stamp, roofline, headline, sweep and max-context tables."""
from collections import defaultdict

REFERENCE_METHOD = {"logits": "pyfused", "linear": "pyfused_linear"}
SCORE_NAME = {"logits": "% HBM floor", "linear": "% cuBLAS bf16"}


def _ms(s):
    return "—" if s is None else f"{s * 1e3:.3g} ms" if s < 10 else f"{s:.3g} s"


def _gb(b):
    return "—" if b is None else f"{b / 1e9:.3g} GB"


def _num(x, fmt="{:.1f}"):
    return "—" if x is None else fmt.format(x)


def _check(r):
    if r["agrees"] is None:
        return "n/c" if r["status"] == "ok" else ""
    return "✓" if r["agrees"] else f"✗ ({r['loss_error']:.2g})"


def cell(r):
    """One sweep cell: ``"time · memory"``, or the reason nothing was measured."""
    if r["status"] != "ok":
        return r["status"]
    text = f"{_ms(r['time_s'])} · {_gb(r['peak_extra_bytes'])}"
    return text + (" ✗" if r["agrees"] is False else "")


def stamp(env, roof):
    libs = ", ".join(f"{k} {v}" for k, v in env.get("libraries", {}).items() if v)
    lines = [f"- device: **{env.get('device')}**" + (f", driver {env['driver']}, CUDA {env.get('cuda')}"
                                                     if env.get("driver") else ""),
             f"- date: {env.get('date_utc')}; command: `{env.get('command')}`; commit {env.get('git_commit')}",
             f"- libraries: {libs}"]
    if env.get("merged_runs", 1) > 1:
        lines.append(f"- merged from {env['merged_runs']} runs (each stamped in summary.json `runs`)")
    if roof:
        lines.append(f"- measured in this run: copy bandwidth **{roof['copy_bytes_per_s'] / 1e12:.2f} TB/s**, "
                     f"cuBLAS bf16 **{roof['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s**")
    else:
        lines.append("- **CPU run**: times are CPU times at toy sizes, peak memory is not measured; "
                     "GPU results live under `bench/results/<gpu>/`.")
    return "\n".join(lines)


def headline_table(records, case_key):
    rows = [r for r in records if r["case"] == case_key]
    if not rows:
        return ""
    path = rows[0]["path"]
    ref = next((r for r in rows if r["method"] == REFERENCE_METHOD[path] and r["status"] == "ok"), None)
    out = [f"| method | fwd+bwd | peak extra memory | peak / input bytes | {SCORE_NAME[path]} | "
           "time vs pyfused_po | memory vs pyfused_po | loss check |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['label']} | {r['status']} | | | | | | |")
            continue
        frac = None if r["peak_extra_bytes"] is None else 100.0 * r["peak_extra_bytes"] / r["input_bytes"]
        t_ratio = m_ratio = None
        if ref is not None:
            t_ratio = r["time_s"] / ref["time_s"]
            if r["peak_extra_bytes"] is not None and ref["peak_extra_bytes"]:
                m_ratio = r["peak_extra_bytes"] / ref["peak_extra_bytes"]
        out.append(f"| {r['label']} | {_ms(r['time_s'])} | {_gb(r['peak_extra_bytes'])} | "
                   f"{_num(frac, '{:.1f}%')} | {_num(r['score_pct'])} | {_num(t_ratio, '{:.2f}×')} | {_num(m_ratio, '{:.2f}×')} | "
                   f"{_check(r)} |")
    return "\n".join(out)


def sweep_tables(records):
    """One table per (path, vocab, dtype, kind, D): rows tokens per pair, columns methods."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["path"], r["vocab"], r["dtype"], r["kind"], r["hidden"])].append(r)
    parts = []
    for (path, vocab, dtype, kind, hidden), rows in sorted(groups.items()):
        methods = list(dict.fromkeys(r["label"] for r in rows))
        by = {(r["tokens_per_pair"], r["pairs"], r["label"]): r for r in rows}
        shapes = sorted({(r["tokens_per_pair"], r["pairs"]) for r in rows})
        d = f", D = {hidden}" if path == "linear" else ""
        parts.append(f"#### {path} path — V = {vocab:,}{d}, {dtype}, {kind} inputs (time · peak extra memory)\n")
        parts.append("| tokens/pair × pairs | " + " | ".join(methods) + " |")
        parts.append("|---" * (len(methods) + 1) + "|")
        for tpp, pairs in shapes:
            cells = [cell(by[(tpp, pairs, m)]) if (tpp, pairs, m) in by else "" for m in methods]
            parts.append(f"| {tpp:,} × {pairs} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts)


def value_check_line(records):
    """One line saying whether every measured method computed the same loss."""
    ok = [r for r in records if r["status"] == "ok"]
    bad = sorted({f"{r['label']} ({r['case']})" for r in ok if r["agrees"] is False})
    unchecked = sorted({r["label"] for r in ok if r["agrees"] is None})
    line = (f"- loss check: {sum(1 for r in ok if r['agrees'])} of {len(ok)} measurements agree with the "
            f"independent reference")
    if unchecked:
        line += f"; not compared by design: {', '.join(unchecked)}"
    if bad:
        line += f"; **DISAGREE: {', '.join(bad)}**"
    return line


def max_context_table(entries):
    if not entries:
        return ""
    out = ["| method | path | max tokens per pair (D = 4096, V = 128,256, bf16) |", "|---|---|---|"]
    for e in entries:
        if e["status"] != "ok":
            value = e["status"] + (f" ({e['note']})" if e.get("note") else "")
        else:
            value = ("≥ " if e["capped"] else "") + f"{e['max_tokens_per_pair']:,}"
        out.append(f"| {e['label']} | {e['path']} | {value} |")
    return "\n".join(out)


def render(summary):
    """The whole Markdown report for one results folder."""
    records = summary["records"]
    parts = ["# pyfused_po benchmark results", "", stamp(summary["environment"], summary.get("roofline")),
             value_check_line(records), ""]
    headline = [k for k in dict.fromkeys(r["case"] for r in records) if any(
        r["case"] == k and r.get("headline") for r in records)]
    if headline:
        parts.append("## Headline: 16,384 tokens × 128,256 vocab, bf16 (8 pairs × 1,024 tokens per sequence)\n")
        for key in headline:
            parts += [f"### `{key}`\n", headline_table(records, key), ""]
    if summary.get("max_context"):
        parts += ["## Max context per pair\n", max_context_table(summary["max_context"]), ""]
    parts += ["## Sweep\n", sweep_tables([r for r in records if not r.get("headline")])]
    parts += ["Cells: median forward+backward time · peak memory above the inputs (incl. gradients). "
              "`✗`: the loss disagreed with the reference; `n/c`: not compared (see bench/README.md)."]
    return "\n".join(parts) + "\n"
