"""Gradient filtering on the real model's activations: how much it skips, how much it drops.

The fused backward (``linear_token_logprobs(..., impl="fused", grad_filter=thr)``) skips
the dH/dW dots of a ``[BLOCK_M tokens, BLOCK_V ids]`` tile when every entry of its
logits gradient is below ``thr`` relative to its token's upstream gradient.  With only
log-probs upstream that is ``dz_ij / g_i = onehot(y_i)_j − p_ij``: the tile is skipped
when ``|onehot − p| < thr`` everywhere in it.  This script measures, independently of the
kernels (PyTorch, float64), on SmolLM2-135M's final hidden states for the shipped
preference pairs (``pyfused_po.testing.smollm2.activations``, labels shifted):

* the fraction of tiles skipped, for the kernel's GPU tiles (128 × 128) and smaller
  token blocks (1 = a per-token filter, the best any tiling can do);
* the relative L2 error of dH and dW against the exact gradient (128 × 128 tiles), for
  ``g = 1`` on every token (a summed NLL) and ``g = ±1`` (chosen +, rejected −: the sign
  pattern of a DPO gradient at policy = reference);
* the dropped L1 mass per token, ``Σ_{skipped j} |G_ij| / Σ_j |G_ij|``: mean, p99, max.

Each is measured with the vocabulary in id order and sorted by mean logit (what the
kernel does for a threshold above 0), on the response tokens (the labels) and on every
non-padding position.  Writes ``bench/results/grad-filter/grad_filter.json`` and ``.md``.
About 2.5 CPU-minutes (the float64 dots dominate; 15 minutes wall on a busy 2-core box)::

    python bench/grad_filter_measure.py
"""
import argparse
import json
import os
import time

import torch

BLOCK_V = 128                     # kernels/linear_launch.linear_config on a GPU
BLOCK_M = 128
TOKEN_BLOCKS = (1, 16, 64, 128)   # tile heights for the skip fraction / dropped mass
THRESHOLDS = {                    # name -> threshold (relative to the token's upstream gradient)
    "2^-8": 2.0 ** -8,
    "2^-10": 2.0 ** -10,
    "eps_bf16/32 = 2^-12": torch.finfo(torch.bfloat16).eps / 32,
    "eps_fp16/32 = 2^-15": torch.finfo(torch.float16).eps / 32,
    "2^-18": 2.0 ** -18,
}
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "grad-filter")


def labelled(act, tokens):
    """``(h [M, D], y [M], chosen [M] bool)`` in the order the fused kernels tile them:
    row-major over ``[2P, T]``, hidden row ``t`` predicting token ``t + 1``.  ``tokens``:
    ``"response"`` (the labels: response tokens only) or ``"all"`` (every non-padding
    position, prompt and chat template included: more tokens, easier ones)."""
    hidden, labels = act["hidden"], act["labels"]
    n_pairs = labels.shape[0] // 2
    if tokens == "response":
        y = labels[:, 1:]
        keep = y != -100
    else:
        y = act["input_ids"][:, 1:]
        keep = act["attention_mask"][:, 1:].bool()
    h = hidden[:, :-1]
    rows = torch.arange(labels.shape[0])[:, None].expand_as(y)
    return h[keep].double(), y[keep], rows[keep] < n_pairs


def sort_vocab(h, y, W):
    """``(y', W')`` with the vocabulary reordered by decreasing mean logit over these tokens
    (``mean_i z_i = mean(h) · Wᵀ``), so that the likely ids share tiles."""
    order = torch.argsort(h.mean(0) @ W.T, descending=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return inverse[y], W[order]


def tile_max(a, rows_per_tile):
    """Max over groups of ``rows_per_tile`` consecutive rows of ``a [M, n]`` (last group ragged)."""
    M = a.shape[0]
    pad = (-M) % rows_per_tile
    a = torch.cat([a, a.new_zeros(pad, a.shape[1])]) if pad else a
    return a.view(-1, rows_per_tile, a.shape[1]).amax(1)


def measure(h, y, chosen, W):
    M, D = h.shape
    V = W.shape[0]
    n_vt = -(-V // BLOCK_V)
    padV = n_vt * BLOCK_V - V
    # Per token and vocabulary tile: max |G| and Σ|G| (g = 1; |g| = 1 for the ± variant too).
    gmax = torch.empty(M, n_vt, dtype=torch.float64)
    gl1 = torch.empty(M, n_vt, dtype=torch.float64)
    dH_exact = torch.zeros(M, D, dtype=torch.float64)
    dW_exact = {"chosen": torch.zeros(V, D, dtype=torch.float64), "rejected": torch.zeros(V, D, dtype=torch.float64)}
    dH_drop = {k: torch.zeros(M, D, dtype=torch.float64) for k in THRESHOLDS}
    dW_drop = {k: {s: torch.zeros(V, D, dtype=torch.float64) for s in ("chosen", "rejected")} for k in THRESHOLDS}
    for m0 in range(0, M, BLOCK_M):
        sl = slice(m0, min(m0 + BLOCK_M, M))
        hb, yb = h[sl], y[sl]
        G = -torch.softmax(hb @ W.T, dim=1)                          # onehot − p
        G[torch.arange(G.shape[0]), yb] += 1.0
        Gp = torch.nn.functional.pad(G.abs(), (0, padV)).view(G.shape[0], n_vt, BLOCK_V)
        gmax[sl], gl1[sl] = Gp.amax(2), Gp.sum(2)
        tmax = gmax[sl].amax(0)                                      # this 128-token block's tiles
        dH_exact[sl] = G @ W
        side = {"chosen": chosen[sl], "rejected": ~chosen[sl]}
        for s, rows in side.items():
            dW_exact[s] += G[rows].T @ hb[rows]
        for name, thr in THRESHOLDS.items():
            cols = (tmax < thr).repeat_interleave(BLOCK_V)[:V]       # skipped vocabulary ids
            if not cols.any():
                continue
            Gd = G * cols[None, :]
            dH_drop[name][sl] = Gd @ W
            for s, rows in side.items():
                dW_drop[name][s] += Gd[rows].T @ hb[rows]

    def rel(drop, exact):
        return float(drop.norm() / exact.norm())

    results = []
    for name, thr in THRESHOLDS.items():
        entry = dict(threshold=name, value=thr, tiles={})
        for bm in TOKEN_BLOCKS:
            skip = tile_max(gmax, bm) < thr                                  # [blocks, n_vt]
            skip_tok = skip.repeat_interleave(bm, 0)[:M]                     # per token
            dropped = (gl1 * skip_tok).sum(1) / gl1.sum(1)
            entry["tiles"][str(bm)] = dict(
                skipped_fraction=float(skip.double().mean()),
                dropped_l1_mean=float(dropped.mean()),
                dropped_l1_p99=float(dropped.quantile(0.99)),
                dropped_l1_max=float(dropped.max()),
            )
        dW_sum = dW_drop[name]["chosen"] + dW_drop[name]["rejected"]
        dW_pm = dW_drop[name]["chosen"] - dW_drop[name]["rejected"]
        entry["rel_l2_dH"] = rel(dH_drop[name], dH_exact)
        entry["rel_l2_dW_g1"] = rel(dW_sum, dW_exact["chosen"] + dW_exact["rejected"])
        entry["rel_l2_dW_pm"] = rel(dW_pm, dW_exact["chosen"] - dW_exact["rejected"])
        results.append(entry)
    return dict(tokens=M, vocab=V, hidden=D, results=results)


VARIANTS = {  # name -> (token set, vocabulary sorted by mean logit)
    "response tokens, vocabulary in id order": ("response", False),
    "response tokens, vocabulary sorted by mean logit": ("response", True),
    "all positions, vocabulary in id order": ("all", False),
    "all positions, vocabulary sorted by mean logit": ("all", True),
}


def markdown(report):
    lines = [
        "# Gradient filtering on SmolLM2-135M activations",
        "",
        f"SmolLM2-135M-Instruct final hidden states on the {report['pairs']} shipped preference pairs "
        f"(chosen + rejected), V = {report['vocab']}, D = {report['hidden']}; float64 PyTorch, independent "
        f"of the kernels: `python bench/grad_filter_measure.py` ({report['seconds']} s on the CPU).",
        "A tile is skipped when every `|G| / |g| = |onehot − p|` in it is below the threshold "
        "(the fused kernel's test with log-prob gradients only).",
        f"dH/dW errors are relative L2 norms of the dropped part, for the kernel's {report['block_m']} × "
        f"{report['block_v']} tiles; `g = 1`: every token's upstream gradient 1; `g = ±1`: chosen +1, "
        "rejected −1 (the sign pattern of a DPO gradient). Dropped L1: per token, "
        "`Σ_skipped |G| / Σ |G|` (mean, 99th percentile, max over tokens).",
        "",
    ]
    for name, rep in report["variants"].items():
        lines += [f"## {name} ({rep['tokens']} tokens)", ""] + _variant_tables(rep, report)
    return "\n".join(lines) + "\n"


def _variant_tables(rep, report):
    lines = [
        "| threshold | tiles skipped (128×128) | rel. L2 dH | rel. L2 dW (g = 1) | rel. L2 dW (g = ±1) "
        "| dropped L1 mean | p99 | max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["results"]:
        t = r["tiles"][str(report["block_m"])]
        lines.append(f"| {r['threshold']} | {t['skipped_fraction']:.1%} | {r['rel_l2_dH']:.2e} | "
                     f"{r['rel_l2_dW_g1']:.2e} | {r['rel_l2_dW_pm']:.2e} | {t['dropped_l1_mean']:.2%} | "
                     f"{t['dropped_l1_p99']:.2%} | {t['dropped_l1_max']:.2%} |")
    lines += ["", "Skipped fraction and dropped L1 mass (mean / p99 / max) by token-block height "
              "(1 = per-token filter):", "",
              "| threshold | " + " | ".join(f"BLOCK_M = {bm}" for bm in report["token_blocks"]) + " |",
              "|---|" + "---|" * len(report["token_blocks"])]
    for r in rep["results"]:
        cells = []
        for bm in report["token_blocks"]:
            t = r["tiles"][str(bm)]
            cells.append(f"{t['skipped_fraction']:.1%} skipped; {t['dropped_l1_mean']:.2%} / "
                         f"{t['dropped_l1_p99']:.1%} / {t['dropped_l1_max']:.1%}")
        lines.append(f"| {r['threshold']} | " + " | ".join(cells) + " |")
    return lines + [""]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=OUT_DIR)
    opts = ap.parse_args()
    from pyfused_po.testing import smollm2

    reason = smollm2.unavailable_reason()
    if reason:
        raise SystemExit(reason)
    t0 = time.time()
    rep = dict(block_m=BLOCK_M, block_v=BLOCK_V, token_blocks=list(TOKEN_BLOCKS), variants={})
    with torch.no_grad():
        act = smollm2.activations()
        rep["pairs"] = int(act["labels"].shape[0] // 2)
        W = act["weight"].double()
        rep["vocab"], rep["hidden"] = W.shape
        for name, (tokens, sort) in VARIANTS.items():
            h, y, chosen = labelled(act, tokens)
            y_v, W_v = sort_vocab(h, y, W) if sort else (y, W)
            rep["variants"][name] = measure(h, y_v, chosen, W_v)
            print(f"{name}: done at {time.time() - t0:.0f} s", flush=True)
    rep["seconds"] = round(time.time() - t0)
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "grad_filter.json"), "w") as f:
        json.dump(rep, f, indent=1)
    md = markdown(rep)
    with open(os.path.join(opts.out, "grad_filter.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
