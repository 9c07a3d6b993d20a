"""PNG plots: time and peak memory vs tokens per pair, one line per method, one figure per
(path, vocab, dtype, kind).  Skipped with a message when matplotlib is missing."""
from collections import defaultdict
from pathlib import Path


def _series(rows, field, scale):
    by_method = defaultdict(list)
    for r in rows:
        if r["status"] == "ok" and r[field] is not None:
            by_method[r["label"]].append((r["tokens_per_pair"], r[field] * scale))
    return {m: sorted(pts) for m, pts in by_method.items()}


def _oom_marks(rows):
    """First tokens-per-pair at which each method ran out of memory (drawn as an ×)."""
    marks = {}
    for r in sorted(rows, key=lambda r: r["tokens_per_pair"]):
        if r["status"] == "OOM":
            marks.setdefault(r["label"], r["tokens_per_pair"])
    return marks


def write_plots(records, out_dir, *, title_prefix=""):
    """Returns the PNG paths written ([] when matplotlib is unavailable)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plots skipped (pip install matplotlib)")
        return []
    groups = defaultdict(list)
    for r in records:
        if not r.get("headline"):  # the sweep proper; the headline is a single point
            groups[(r["path"], r["vocab"], r["dtype"], r["kind"])].append(r)
    out, paths = Path(out_dir), []
    out.mkdir(parents=True, exist_ok=True)
    for (path, vocab, dtype, kind), rows in sorted(groups.items()):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, field, scale, ylabel in ((axes[0], "time_s", 1e3, "forward + backward (ms)"),
                                         (axes[1], "peak_extra_bytes", 1e-9, "peak memory above inputs (GB)")):
            series = _series(rows, field, scale)
            for label, pts in series.items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            if not series:
                ax.text(0.5, 0.5, "not measured on this device", ha="center", transform=ax.transAxes)
            ax.set_xscale("log", base=2)
            if series:
                ax.set_yscale("log")
            ax.set_xlabel("tokens per pair")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        for label, tpp in _oom_marks(rows).items():
            axes[1].axvline(tpp, linestyle=":", alpha=0.4)
            axes[1].annotate(f"{label}: OOM", (tpp, 0.95), xycoords=("data", "axes fraction"),
                             rotation=90, fontsize=7, va="top")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{title_prefix}{path} path, V = {vocab:,}, {dtype}, {kind} inputs")
        fig.tight_layout()
        name = out / f"{path}-V{vocab}-{dtype}-{kind}.png"
        fig.savefig(name, dpi=110)
        plt.close(fig)
        paths.append(name)
    return paths


def write_cpu_plots(records, out_dir):
    """CPU runs (one shape per path): per case, median time with min–max whiskers and peak
    extra memory as bars, one bar per measured method.  Returns the PNG paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plots skipped (pip install matplotlib)")
        return []
    out, paths = Path(out_dir), []
    out.mkdir(parents=True, exist_ok=True)
    for key in dict.fromkeys(r["case"] for r in records):
        rows = [r for r in records if r["case"] == key and r["status"] == "ok"]
        if not rows:
            continue
        labels = [r["label"] for r in rows]
        y = list(range(len(rows)))
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.6 * len(rows) + 1.8))
        med = [r["time_s"] * 1e3 for r in rows]
        lo = [m - min(r["times_s"]) * 1e3 for m, r in zip(med, rows)]
        hi = [max(r["times_s"]) * 1e3 - m for m, r in zip(med, rows)]
        axes[0].barh(y, med, xerr=[lo, hi], capsize=3, color="tab:blue")
        axes[0].set_xlabel("forward + backward on the CPU (ms): median, min – max")
        mem = [(r["peak_extra_bytes"] or 0) / 1e6 for r in rows]
        axes[1].barh(y, mem, color="tab:orange")
        for yi, r, m in zip(y, rows, mem):
            if r["peak_extra_bytes"] is None:
                axes[1].text(0, yi, " not measured", va="center", fontsize=8)
            else:
                axes[1].text(m, yi, f" {m:,.0f}", va="center", fontsize=8)
        axes[1].set_xlabel("peak extra memory (MB): RSS high-water − baseline")
        axes[1].set_xlim(0, 1.18 * max(mem + [1e-3]))
        for ax in axes:
            ax.set_yticks(y)
            ax.set_yticklabels(labels if ax is axes[0] else [])
            ax.invert_yaxis()
            ax.grid(True, axis="x", alpha=0.3)
        fig.suptitle(f"CPU, {key} (CPU times say nothing about GPU speed)", fontsize=10)
        fig.tight_layout()
        name = out / f"cpu-{key}.png"
        fig.savefig(name, dpi=110)
        plt.close(fig)
        paths.append(name)
    return paths
