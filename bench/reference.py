"""Independent reference for the value check: per-sequence summed log-probs.

On a GPU the per-token pass runs in fp32 (fp64 is slow there) and sums in fp64; on the CPU
everything is fp64, so the CPU table's agreement is with a float64 reference.

Computed chunk by chunk without autograd (bounded memory), straight from the formula
``log p(y) = z_y − logsumexp(z)``; none of the benchmarked methods is called.  The
reference log-probs of the DPO loss are then set so that every pair has the margin
``h = β·((c − c_ref) − (r − r_ref)) = MARGIN``: swapping chosen and rejected, or a wrong
sum, moves the loss far from ``softplus(−MARGIN)``.
"""
import math

import torch

BETA = 0.1
MARGIN = 1.5
CHUNK_ELEMENTS = 1 << 26


def _token_logps(z, labels):
    return z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


@torch.no_grad()
def reference_pair_sums(case, inputs):
    """``(chosen_sums, rejected_sums)``, float64 ``[P]`` each, for one ``Inputs``
    (per-token pass in fp32 on CUDA, fp64 elsewhere)."""
    labels = inputs.labels.reshape(-1)
    n = labels.numel()
    work = torch.float32 if labels.device.type == "cuda" else torch.float64
    out = torch.empty(n, dtype=work, device=labels.device)
    step = max(1, CHUNK_ELEMENTS // case.vocab)
    if case.path == "logits":
        flat = inputs.logits.detach().reshape(n, case.vocab)
        for i in range(0, n, step):
            out[i:i + step] = _token_logps(flat[i:i + step].to(work), labels[i:i + step])
    else:
        w = inputs.weight.detach().to(work)
        flat = inputs.hidden.detach().reshape(n, case.hidden)
        for i in range(0, n, step):
            out[i:i + step] = _token_logps(flat[i:i + step].to(work) @ w.t(), labels[i:i + step])
        del w
    sums = out.view(2 * case.pairs, case.seq_len).double().sum(-1)
    return sums[:case.pairs], sums[case.pairs:]


def attach_reference(inputs_list, sums, *, beta=BETA, margin=MARGIN):
    """Stores ``ref_chosen``/``ref_rejected`` (fp32) on every copy; returns the expected loss
    (float64, from the stored fp32 values) and the scale of the sums (for tolerances)."""
    chosen, rejected = sums
    shift = 0.5 * margin / beta
    ref_c = (chosen - shift).float()
    ref_r = (rejected + shift).float()
    for inp in inputs_list:
        inp.ref_chosen, inp.ref_rejected = ref_c.clone(), ref_r.clone()
    h = beta * ((chosen - ref_c.double()) - (rejected - ref_r.double()))
    expected = torch.nn.functional.softplus(-h).mean().item()
    scale = (chosen.abs() + rejected.abs()).max().item()
    return expected, scale


def expected_reference_free(sums, *, beta=BETA):
    """The loss of a method that takes no reference log-probs (reference = 0):
    ``mean softplus(−β·(c − r))``, float64."""
    chosen, rejected = sums
    return torch.nn.functional.softplus(-beta * (chosen - rejected)).mean().item()


def loss_tolerance(case, scale, *, beta=BETA):
    """How far a correct method may land from the reference loss (|dloss/dh| ≤ 1).

    fp32 summation of ~T log-probs of size ~log V costs ~1e-6 relative; on the linear
    path with 16-bit inputs each logit is rounded once more (~2⁻⁹ relative, random sign),
    ~4e-3·√T in the sum.
    """
    tol_sum = 2e-6 * scale
    if case.path == "linear" and case.dtype != "fp32":
        tol_sum += 4e-3 * math.sqrt(case.seq_len)
    return 2e-3 + beta * tol_sum
