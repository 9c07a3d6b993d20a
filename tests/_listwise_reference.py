"""Float64 references of the listwise losses, written from their definitions with Python
loops over torch scalars (so autograd gives reference gradients).  Shared by the listwise tests."""
import math

import torch


def groups(scores, group_ids):
    """{g: member ids by descending score, ties in sequence order} (plain Python)."""
    out = {}
    for i, g in enumerate(group_ids):
        out.setdefault(int(g), []).append(i)
    return [sorted(out[g], key=lambda i: -float(scores[i])) for g in sorted(out)]


def log_sum_exp(values):
    top = max(v.item() for v in values)
    return top + torch.log(sum(torch.exp(v - top) for v in values))


def log_sigmoid(x):
    return -torch.log1p(torch.exp(-x)) if x.item() >= 0 else x - torch.log1p(torch.exp(x))


# Each reference: one group's loss from its u (members by descending score) and scores.
def ref_plackett_luce(u, psi, top_m=None):
    m = len(u) if top_m is None else min(top_m, len(u))
    return -sum(u[k] - log_sum_exp(u[k:]) for k in range(m))


def ref_softmax_dpo(u, psi):
    return -log_sigmoid(-log_sum_exp([u[j] - u[0] for j in range(1, len(u))]))


def ref_lipo_lambda(u, psi):
    by_u = sorted(range(len(u)), key=lambda i: -u[i].item())  # stable: ties in row order
    rank = {i: r + 1 for r, i in enumerate(by_u)}
    total = 0.0
    for i in range(len(u)):
        for j in range(len(u)):
            if psi[i] > psi[j]:
                gain = abs((2.0 ** psi[i] - 1) - (2.0 ** psi[j] - 1))
                disc = abs(1 / math.log(1 + rank[i]) - 1 / math.log(1 + rank[j]))
                total = total - gain * disc * log_sigmoid(u[i] - u[j])
    return total


def ref_pairwise(pair_loss):
    def group_loss(u, psi, members=None):
        pairs = [(i, j) for i in range(len(u)) for j in range(len(u)) if psi[i] > psi[j]]
        return sum(pair_loss(i, j) for i, j in pairs) / len(pairs)
    return group_loss


def reference(loss_of_group, logps, ref, scores, group_ids, beta):
    """[G] losses from a per-group reference, in torch float64 scalars (for autograd)."""
    out = []
    for members in groups(scores, group_ids):
        u = [beta * (logps[i] - ref[i]) for i in members]
        psi = [float(scores[i]) for i in members]
        out.append(loss_of_group(u, psi))
    return torch.stack(out)


def ref_adpo(u, psi, tau):
    z = log_sum_exp([torch.tensor(p / tau, dtype=torch.float64) for p in psi])
    q = [math.exp(p / tau - z.item()) for p in psi]
    lse_u = log_sum_exp(u)
    return sum(qi * (math.log(qi) - (ui - lse_u)) for qi, ui in zip(q, u) if qi > 0)
