"""CPU time of one FusedKTOLoss step (hidden states + LM head → loss → backward), fused against staged.

``python bench/kto_step_time.py [--reps N] [--threads T]`` runs the work counters' rows
(:func:`bench.work_counters.make_batch`: 4 sequences × 256, V = 8192, D = 128, chunk budget 2²²
logits) through ``FusedKTOLoss`` with ``fused_gradient`` on and off, alternating the two plans
rep by rep, and prints the best and median wall and process CPU time of each and their ratios.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def step_time(fused, batch, budget, reps):
    from pyfused_po import FusedKTOLoss

    V = batch["weight"].shape[0]
    P = batch["ref_chosen"].shape[0]
    desirable = torch.arange(2 * P) < P
    ref = torch.cat([batch["ref_chosen"], batch["ref_rejected"]])
    module = FusedKTOLoss(beta=batch["beta"], backend="torch", linear_impl="chunked")
    module.fused_gradient = fused
    module.chunk_tokens = max(1, budget // V)
    hidden = batch["hidden"].clone().requires_grad_(True)
    weight = batch["weight"].clone().requires_grad_(True)
    times = []
    for _ in range(reps):
        hidden.grad = weight.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        module(hidden=hidden, weight=weight, labels=batch["labels"], is_desirable=desirable, ref_logps=ref,
               kl=0.1).loss.backward()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def main(argv=None):
    from bench.work_counters import make_batch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget", type=int, default=1 << 22)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch = make_batch()
    step_time(True, batch, args.budget, 1)  # warm-up
    step_time(False, batch, args.budget, 1)
    times = {True: [], False: []}
    for _ in range(args.reps):  # alternate, so load drift on a shared machine hits both plans
        for fused in (True, False):
            times[fused] += step_time(fused, batch, args.budget, 1)
    # Process CPU time is the steadier figure on a shared machine (other processes' load shows in
    # the wall time, not in this process's CPU seconds).
    summary = {}
    for fused in (True, False):
        wall, cpu = [t[0] for t in times[fused]], [t[1] for t in times[fused]]
        summary[fused] = (min(wall), statistics.median(wall), min(cpu), statistics.median(cpu))
        print(f"{'fused (3 GEMMs)' if fused else 'staged (4 GEMMs)':17s} wall best {summary[fused][0]:.3f} s, "
              f"median {summary[fused][1]:.3f} s; CPU best {summary[fused][2]:.3f} s, median {summary[fused][3]:.3f} s")
    ratio = [a / b for a, b in zip(summary[True], summary[False])]
    print(f"fused / staged: wall best {ratio[0]:.2f}, median {ratio[1]:.2f}; CPU best {ratio[2]:.2f}, "
          f"median {ratio[3]:.2f}")

if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
