"""Padded against packed batches at skewed lengths: rows processed, peak memory, time.

``python bench/packed_vs_padded.py`` runs one subprocess per (layout, path) so that each peak
RSS (``ru_maxrss``, the process's high-water mark) belongs to that layout alone, and writes
``bench/results/packed/packed_vs_padded.{json,md}``.

The batch: ``P`` pairs whose lengths are skewed as real preference data is (most responses
short, a few long).  Padded, every sequence is a row of ``T = max length`` tokens; packed, the
sequences are one ``[1, N]`` stream with ``cu_seqlens``.  Each child builds the inputs the model
would hand over (logits ``[rows, V]`` for the logits path, hidden ``[rows, D]`` + head for the
fused-linear path; fp32, CPU, torch backend), runs one FusedPreferenceLoss forward + backward
and reports: rows in the batch tensor (what the model computes), labelled tokens (the same for
both), the step's wall time and the RSS high-water above the process's baseline after warm-up.
The loss values of the two layouts are compared too (they must agree).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "packed")
SHAPE = dict(pairs=8, vocab=4096, dim=256, short=(24, 96), long=(900, 1024), n_long=2, prompt=16, seed=0)


def skewed_lengths(torch, shape):
    """2P sequence lengths: mostly short, ``n_long`` long ones (a long-tailed length mix)."""
    g = torch.Generator().manual_seed(shape["seed"])
    S = 2 * shape["pairs"]
    lengths = torch.randint(shape["short"][0], shape["short"][1] + 1, (S,), generator=g)
    longs = torch.randperm(S, generator=g)[:shape["n_long"]]
    lengths[longs] = torch.randint(shape["long"][0], shape["long"][1] + 1, (shape["n_long"],), generator=g)
    return lengths


def build(torch, shape, layout, path):
    """The step's inputs for ``layout`` ("padded" / "packed") and ``path`` ("logits" / "hidden")."""
    lengths = skewed_lengths(torch, shape)
    S, V, D = lengths.numel(), shape["vocab"], shape["dim"]
    g = torch.Generator().manual_seed(shape["seed"] + 1)
    T = int(lengths.max())
    # Per-sequence tokens drawn once, so both layouts hold the same sequences.
    seqs = [torch.randint(0, V, (int(n),), generator=g) for n in lengths]
    labels_seq = []
    for s in seqs:
        y = s.clone()
        y[:shape["prompt"]] = -100
        labels_seq.append(y)
    if layout == "padded":
        labels = torch.full((S, T), -100, dtype=torch.int64)
        for i, y in enumerate(labels_seq):
            labels[i, :y.numel()] = y
        rows, kw = S * T, {}
    else:
        labels = torch.cat(labels_seq).unsqueeze(0)
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        rows, kw = labels.numel(), dict(cu_seqlens=cu)
    width = V if path == "logits" else D
    # The same per-sequence values in both layouts, written into one preallocated tensor.
    data = torch.zeros(*labels.shape, width)
    flat = data.view(-1, width)
    start = 0
    for i, n in enumerate(lengths.tolist()):
        block = torch.randn(n, width, generator=g)
        at = i * T if layout == "padded" else start
        flat[at:at + n] = block
        start += n
        del block
    if path == "logits":
        source = dict(logits=data.requires_grad_())
    else:
        head = torch.randn(V, D, generator=g) / D ** 0.5
        source = dict(hidden=data.requires_grad_(), weight=head.requires_grad_())
    return labels, source, kw, rows, int((labels != -100).sum())


def child(layout, path):
    import torch

    from pyfused_po import FusedPreferenceLoss

    torch.set_num_threads(1)
    loss_fn = FusedPreferenceLoss("simpo", beta=2.0, shift=True, backend="torch", logit_metrics=False)
    # Warm-up on a tiny batch so the baseline includes the allocator's and the code's own pages.
    small = dict(SHAPE, pairs=1, short=(4, 6), long=(8, 9), n_long=1, prompt=1, vocab=64, dim=8)
    labels, source, kw, _, _ = build(torch, small, layout, path)
    loss_fn(labels=labels, **source, **kw).loss.backward()
    del labels, source
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    labels, source, kw, rows, labelled = build(torch, SHAPE, layout, path)
    t0 = time.perf_counter()
    out = loss_fn(labels=labels, **source, **kw)
    out.loss.backward()
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    width = SHAPE["vocab"] if path == "logits" else SHAPE["dim"]
    print(json.dumps(dict(layout=layout, path=path, rows=rows, labelled_tokens=labelled, wall_s=wall,
                          batch_tensor_and_grad_mib=2 * rows * width * 4 / 2 ** 20,
                          peak_rss_above_baseline_mib=(peak - base) / 1024.0, loss=float(out.loss))))


def run_child(layout, path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        filter(None, [os.path.dirname(HERE), os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, __file__, "--child", layout, path], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def markdown(results, shape):
    lines = ["# Padded vs packed at skewed lengths", "",
             f"FusedPreferenceLoss (simpo, shift=True), torch backend, CPU fp32, one forward + backward. "
             f"{shape['pairs']} pairs, vocabulary {shape['vocab']}, hidden {shape['dim']}; lengths "
             f"{shape['short'][0]}–{shape['short'][1]} tokens except {shape['n_long']} of "
             f"{shape['long'][0]}–{shape['long'][1]}. Peak = RSS high-water above the child process's "
             "baseline after warm-up (one process per row).", "",
             "| path | layout | rows in the batch tensor | labelled tokens | batch tensor + its grad (MiB) "
             "| peak RSS (MiB) | wall (s) | loss |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['path']} | {r['layout']} | {r['rows']} | {r['labelled_tokens']} | "
                     f"{r['batch_tensor_and_grad_mib']:.1f} | "
                     f"{r['peak_rss_above_baseline_mib']:.1f} | {r['wall_s']:.3f} | {r['loss']:.6f} |")
    lines.append("")
    for path in ("logits", "hidden"):
        pad = next(r for r in results if r["path"] == path and r["layout"] == "padded")
        pk = next(r for r in results if r["path"] == path and r["layout"] == "packed")
        lines.append(f"- {path}: packed processes {pk['rows'] / pad['rows']:.3f}× the rows, peak "
                     f"{pk['peak_rss_above_baseline_mib'] / max(pad['peak_rss_above_baseline_mib'], 1e-9):.3f}× "
                     f"the memory, {pk['wall_s'] / pad['wall_s']:.3f}× the time of padded.")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2, metavar=("LAYOUT", "PATH"))
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    results = [run_child(layout, path) for path in ("logits", "hidden") for layout in ("padded", "packed")]
    for path in ("logits", "hidden"):
        a, b = (r["loss"] for r in results if r["path"] == path)
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), f"{path}: padded loss {a} != packed loss {b}"
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "packed_vs_padded.json"), "w") as f:
        json.dump(dict(shape=SHAPE, results=results), f, indent=2)
    with open(os.path.join(OUT, "packed_vs_padded.md"), "w") as f:
        f.write(markdown(results, SHAPE))
    print(markdown(results, SHAPE))


if __name__ == "__main__":
    main()
