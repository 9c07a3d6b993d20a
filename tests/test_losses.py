"""Every preference loss through preference_loss vs an independent float64 formula.

Each reference below is written from the paper / TRL v1 definition with plain torch
float64 ops; the library is only called as the system under test.
"""
import math

import pytest
import torch

import pyfused_po
from reference import max_rel_err

TOL = 1e-11


def logsig(x):
    """log σ(x): −log(1 + e^{−x}) for x ≥ 0, x − log(1 + e^{x}) below (each branch fed only
    the values where it is exact, so neither overflows nor poisons the gradient)."""
    zero = torch.zeros_like(x)
    pos, neg = torch.where(x >= 0, x, zero), torch.where(x < 0, x, zero)
    return torch.where(x >= 0, -torch.log1p(torch.exp(-pos)), neg - torch.log1p(torch.exp(neg)))


def smooth(x, eps):
    return -(1 - eps) * logsig(x) - eps * logsig(-x)


def avg(s, n):
    return s / torch.clamp(n, min=1.0)


def tok_mean_nll(nll_s, nll_n):
    return -nll_s.sum() / torch.clamp(nll_n.sum(), min=1.0)


# --- references: (inputs dict, beta, hp) -> (per-pair losses, chosen rewards, rejected rewards, extra metrics)

def dpo_rewards(d, beta):
    return beta * (d["pc"] - d["rc"]), beta * (d["pr"] - d["rr"])


def ref_sigmoid(d, beta, label_smoothing=0.0):
    h = (d["pc"] - d["rc"]) - (d["pr"] - d["rr"])
    return (smooth(beta * h, label_smoothing), *dpo_rewards(d, beta), {})


def ref_hinge(d, beta):
    h = (d["pc"] - d["rc"]) - (d["pr"] - d["rr"])
    return (torch.clamp(1 - beta * h, min=0.0), *dpo_rewards(d, beta), {})


def ref_ipo(d, beta):
    h = avg(d["pc"] - d["rc"], d["nc"]) - avg(d["pr"] - d["rr"], d["nr"])
    return ((h - 1 / (2 * beta)) ** 2, *dpo_rewards(d, beta), {})


def ref_sigmoid_norm(d, beta):
    h = avg(d["pc"] - d["rc"], d["nc"]) - avg(d["pr"] - d["rr"], d["nr"])
    return (-logsig(beta * h), *dpo_rewards(d, beta), {})


def ref_robust(d, beta, label_smoothing=0.0):
    x = beta * ((d["pc"] - d["rc"]) - (d["pr"] - d["rr"]))
    e = label_smoothing
    return ((-(1 - e) * logsig(x) + e * logsig(-x)) / (1 - 2 * e), *dpo_rewards(d, beta), {})


def ref_exo_pair(d, beta, label_smoothing=1e-3):
    x = beta * ((d["pc"] - d["rc"]) - (d["pr"] - d["rr"]))
    qw, ql = torch.sigmoid(x), torch.sigmoid(-x)
    e = label_smoothing
    loss = qw * (logsig(x) - math.log(1 - e)) + ql * (logsig(-x) - math.log(e))
    return (loss, *dpo_rewards(d, beta), {})


def ref_nca_pair(d, beta):
    a, b = beta * (d["pc"] - d["rc"]), beta * (d["pr"] - d["rr"])
    return (-logsig(a) - 0.5 * logsig(-a) - 0.5 * logsig(-b), *dpo_rewards(d, beta), {})


def ref_bco_pair(d, beta, bco_delta=0.0):
    a, b = beta * (d["pc"] - d["rc"]), beta * (d["pr"] - d["rr"])
    loss = -logsig(a - bco_delta) - logsig(-(b - bco_delta))
    return (loss, *dpo_rewards(d, beta), {"bco_delta": torch.tensor(float(bco_delta), dtype=torch.float64)})


def ref_sppo_hard(d, beta):
    a, b = d["pc"] - d["rc"], d["pr"] - d["rr"]
    return ((a - 1 / (2 * beta)) ** 2 + (b + 1 / (2 * beta)) ** 2, *dpo_rewards(d, beta), {})


def ref_discopop(d, beta, discopop_tau=0.05):
    x = beta * ((d["pc"] - d["rc"]) - (d["pr"] - d["rr"]))
    m = torch.sigmoid(x / discopop_tau)
    return ((1 - m) * -logsig(x) + m * torch.exp(-x), *dpo_rewards(d, beta), {})


def ref_aot(d, beta, label_smoothing=0.0):
    pol = torch.sort(d["pc"] - d["pr"]).values
    ref = torch.sort(d["rc"] - d["rr"]).values
    return (smooth(beta * (pol - ref), label_smoothing), *dpo_rewards(d, beta), {})


def ref_aot_unpaired(d, beta, label_smoothing=0.0):
    a = torch.sort(d["pc"] - d["rc"]).values
    b = torch.sort(d["pr"] - d["rr"]).values
    return (smooth(beta * (a - b), label_smoothing), *dpo_rewards(d, beta), {})


def ref_apo_zero(d, beta):
    a, b = beta * (d["pc"] - d["rc"]), beta * (d["pr"] - d["rr"])
    return (1 - torch.sigmoid(a) + torch.sigmoid(b), *dpo_rewards(d, beta), {})


def ref_apo_down(d, beta):
    a, b = beta * (d["pc"] - d["rc"]), beta * (d["pr"] - d["rr"])
    return (torch.sigmoid(a) + 1 - torch.sigmoid(a - b), *dpo_rewards(d, beta), {})


def ref_sft(d, beta):
    nll = tok_mean_nll(d["nll_s"], d["nll_n"])
    return (nll * torch.ones_like(d["pc"]), *dpo_rewards(d, beta), {"nll_loss": nll})


def ref_hdpo(d, beta, hdpo_alpha=1.0):
    a = hdpo_alpha * d["pc"] - d["rc"]
    b = hdpo_alpha * d["pr"] - d["rr"]
    return (-logsig(beta * (a - b)), beta * a, beta * b, {})


def _nll_term(d, cpo_alpha, loss):
    if cpo_alpha == 0:
        return loss, {}
    nll = tok_mean_nll(d["nll_s"], d["nll_n"])
    return loss + cpo_alpha * nll, {"nll_loss": nll}


def ref_cpo(d, beta, label_smoothing=0.0, cpo_alpha=1.0):
    loss, m = _nll_term(d, cpo_alpha, smooth(beta * (d["pc"] - d["pr"]), label_smoothing))
    return loss, beta * d["pc"], beta * d["pr"], m


def ref_simpo(d, beta, simpo_gamma=0.5, label_smoothing=0.0, cpo_alpha=0.0):
    a, b = avg(d["pc"], d["nc"]), avg(d["pr"], d["nr"])
    loss, m = _nll_term(d, cpo_alpha, smooth(beta * (a - b) - simpo_gamma, label_smoothing))
    return loss, beta * a, beta * b, m


def ref_alphapo(d, beta, alpha=0.0, simpo_gamma=0.5, label_smoothing=0.0, cpo_alpha=0.0):
    def u(lbar):  # (1 − p̄^(−α))/α with p̄ = exp(ℓ̄)
        return lbar if alpha == 0 else (1 - torch.exp(lbar) ** (-alpha)) / alpha
    a, b = u(avg(d["pc"], d["nc"])), u(avg(d["pr"], d["nr"]))
    loss, m = _nll_term(d, cpo_alpha, smooth(beta * (a - b) - simpo_gamma, label_smoothing))
    return loss, beta * a, beta * b, m


def ref_orpo(d, beta):
    a, b = avg(d["pc"], d["nc"]), avg(d["pr"], d["nr"])
    log_odds = (a - b) - (torch.log(1 - torch.exp(a)) - torch.log(1 - torch.exp(b)))
    ratio = logsig(log_odds)
    nll = tok_mean_nll(d["nll_s"], d["nll_n"])
    metrics = {"log_odds_ratio": ratio.mean(), "log_odds_chosen": log_odds.mean(), "nll_loss": nll}
    return nll - beta * ratio, beta * a, beta * b, metrics


CASES = [
    ("sigmoid", ref_sigmoid, {}), ("sigmoid", ref_sigmoid, {"label_smoothing": 0.3}),
    ("hinge", ref_hinge, {}), ("ipo", ref_ipo, {}), ("sigmoid_norm", ref_sigmoid_norm, {}),
    ("robust", ref_robust, {"label_smoothing": 0.2}), ("exo_pair", ref_exo_pair, {}),
    ("exo_pair", ref_exo_pair, {"label_smoothing": 0.1}), ("nca_pair", ref_nca_pair, {}),
    ("bco_pair", ref_bco_pair, {}), ("bco_pair", ref_bco_pair, {"bco_delta": 0.7}),
    ("sppo_hard", ref_sppo_hard, {}), ("discopop", ref_discopop, {}),
    ("discopop", ref_discopop, {"discopop_tau": 2.0}), ("aot", ref_aot, {"label_smoothing": 0.1}),
    ("aot_unpaired", ref_aot_unpaired, {}), ("apo_zero", ref_apo_zero, {}), ("apo_down", ref_apo_down, {}),
    ("sft", ref_sft, {}), ("hdpo", ref_hdpo, {}), ("hdpo", ref_hdpo, {"hdpo_alpha": 0.6}),
    ("cpo", ref_cpo, {}), ("cpo", ref_cpo, {"label_smoothing": 0.1, "cpo_alpha": 0.0}),
    ("simpo", ref_simpo, {}), ("simpo", ref_simpo, {"simpo_gamma": 1.5, "label_smoothing": 0.2, "cpo_alpha": 0.5}),
    ("alphapo", ref_alphapo, {"alpha": 0.25}), ("alphapo", ref_alphapo, {}),
    ("orpo", ref_orpo, {}),
]


def make_inputs(beta, P=8, seed=0):
    """Random sums/lengths with a tie (h = 0), |βh| ≈ 50 both ways and lengths 0, 1, 2."""
    g = torch.Generator().manual_seed(seed)
    n = lambda: torch.randint(1, 30, (P,), generator=g).double()  # noqa: E731
    nc, nr = n(), n()
    nc[:3] = torch.tensor([0.0, 1.0, 2.0])
    nr[3] = 1.0
    pc, pr = -torch.rand(P, generator=g, dtype=torch.float64) * nc * 2, -torch.rand(P, generator=g, dtype=torch.float64) * nr * 2
    rc, rr = -torch.rand(P, generator=g, dtype=torch.float64) * nc * 2, -torch.rand(P, generator=g, dtype=torch.float64) * nr * 2
    pc[0] = 0.0  # empty response: sum 0
    rc[4], rr[4], pr[4] = rr[4], rr[4], pc[4]  # tie: h = 0
    rc[5] = rr[5] = -5.0
    pr[5] = pc[5] - 50.0 / beta  # βh = +50
    rc[6] = rr[6] = -3.0
    pc[6] = pr[6] - 50.0 / beta  # βh = −50
    nll_n = nc + torch.randint(0, 5, (P,), generator=g).double()
    nll_s = pc - torch.rand(P, generator=g, dtype=torch.float64) * (nll_n - nc)
    return dict(pc=pc, pr=pr, rc=rc, rr=rr, nc=nc, nr=nr, nll_s=nll_s, nll_n=nll_n)


def run_case(loss_type, ref_fn, hp, beta, d, **extra):
    leaves = {k: d[k].clone().requires_grad_() for k in ("pc", "pr", "nll_s")}
    dd = {**d, **leaves}
    out = pyfused_po.preference_loss(
        dd["pc"], dd["pr"], d["rc"], d["rr"], loss_type=loss_type, beta=beta, chosen_lengths=d["nc"],
        rejected_lengths=d["nr"], nll_logps=dd["nll_s"], nll_lengths=d["nll_n"], **hp, **extra)
    ref_leaves = {k: d[k].clone().requires_grad_() for k in ("pc", "pr", "nll_s")}
    rd = {**d, **ref_leaves}
    losses, cr, rr, extra_metrics = ref_fn(rd, beta, **hp)
    return out, leaves, (losses, cr, rr, extra_metrics), ref_leaves


def check_all(out, leaves, ref, ref_leaves, P):
    losses, cr, rr, extra_metrics = ref
    assert torch.isfinite(out.losses).all()
    assert max_rel_err(out.losses, losses) <= TOL
    assert math.isclose(out.loss.item(), losses.mean().item(), rel_tol=TOL, abs_tol=1e-12)
    got = torch.autograd.grad(out.loss, list(leaves.values()), allow_unused=True)
    want = torch.autograd.grad(losses.mean(), list(ref_leaves.values()), allow_unused=True)
    for name, a, b in zip(leaves, got, want):
        a = torch.zeros(P, dtype=torch.float64) if a is None else a
        b = torch.zeros(P, dtype=torch.float64) if b is None else b
        assert max_rel_err(a, b) <= TOL, name
    cr, rr = cr.detach(), rr.detach()
    expected = {"rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(),
                "rewards/accuracies": (cr > rr).double().mean(), "rewards/margins": (cr - rr).mean(),
                "logps/chosen": leaves["pc"].detach().mean(), "logps/rejected": leaves["pr"].detach().mean(),
                **{k: v.detach() for k, v in extra_metrics.items()}}
    assert set(out.metrics) == set(expected)
    for k, v in expected.items():
        assert math.isclose(out.metrics[k].item(), v.item(), rel_tol=TOL, abs_tol=1e-12), k


@pytest.mark.parametrize("beta", [0.1, 2.0])
@pytest.mark.parametrize("loss_type,ref_fn,hp", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_loss_matches_formula(loss_type, ref_fn, hp, beta):
    d = make_inputs(beta)
    if loss_type == "orpo":  # log(1 − e^ℓ̄) needs ℓ̄ < 0 and an empty response has no odds: none here
        d["pc"][0], d["nc"][0] = -0.3, 1.0
    out, leaves, ref, ref_leaves = run_case(loss_type, ref_fn, hp, beta, d)
    check_all(out, leaves, ref, ref_leaves, d["pc"].numel())


# TRL 1.16's f'(t) at t = π/π_ref = e^u, constant included (DPOTrainer._compute_loss): the constant
# cancels in s_w − s_l but not in ipo / sigmoid_norm (divided by each side's length) nor in the
# losses that read one side alone (nca_pair, bco_pair, sppo_hard).
F_SCORES = {
    "forward_kl": lambda u, a: 1 - 1 / torch.exp(u),                       # f'(t) = 1 − 1/t
    "js_divergence": lambda u, a: torch.log(2 * torch.exp(u) / (torch.exp(u) + 1)),  # log(2t/(t+1))
    "alpha_divergence": lambda u, a: (torch.exp(torch.clamp((a - 1) * u, max=80.0)) - 1) / (a - 1),
}


def _f_reference(loss_type, a, b, pc, d, beta):
    """Per-pair loss of ``loss_type`` on the scores a = s_w, b = s_l (float64, from the formulas)."""
    x = beta * (a - b)
    if loss_type == "sigmoid":
        return -logsig(x)
    if loss_type == "hinge":
        return torch.clamp(1 - x, min=0.0)
    if loss_type == "ipo":
        return (avg(a, d["nc"]) - avg(b, d["nr"]) - 1 / (2 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        return -logsig(beta * (avg(a, d["nc"]) - avg(b, d["nr"])))
    if loss_type == "robust":
        return -logsig(x)  # ε = 0
    if loss_type == "exo_pair":
        return torch.sigmoid(x) * (logsig(x) - math.log(1 - 1e-3)) + torch.sigmoid(-x) * (logsig(-x) - math.log(1e-3))
    if loss_type == "nca_pair":
        return -logsig(beta * a) - 0.5 * logsig(-beta * a) - 0.5 * logsig(-beta * b)
    if loss_type == "bco_pair":
        return -logsig(beta * a) - logsig(-beta * b)
    if loss_type == "sppo_hard":
        return (a - 1 / (2 * beta)) ** 2 + (b + 1 / (2 * beta)) ** 2
    if loss_type == "apo_down":
        return torch.sigmoid(beta * (pc - d["rc"])) + 1 - torch.sigmoid(x)
    assert loss_type == "discopop"
    m = torch.sigmoid(x / 0.05)
    return (1 - m) * -logsig(x) + m * torch.exp(-x)


F_LOSS_TYPES = ["sigmoid", "hinge", "ipo", "sigmoid_norm", "robust", "exo_pair", "nca_pair", "bco_pair",
                "sppo_hard", "apo_down", "discopop"]


@pytest.mark.parametrize("f_type,coef", [("forward_kl", 1.0), ("js_divergence", 1.0),
                                         ("alpha_divergence", 0.5), ("alpha_divergence", 3.0)])
@pytest.mark.parametrize("loss_type", F_LOSS_TYPES)
def test_f_divergence_scores(f_type, coef, loss_type):
    beta = 0.5
    d = make_inputs(beta)
    d = {k: (v / 20 if k in ("pc", "pr", "rc", "rr", "nll_s") else v) for k, v in d.items()}  # keep e^{−u} sane
    if coef == 3.0:
        d["pc"][7] = d["rc"][7] + 45.0  # (α−1)u = 90 > 80: the exponent is clamped
    leaves = {k: d[k].clone().requires_grad_() for k in ("pc", "pr")}
    out = pyfused_po.preference_loss(leaves["pc"], leaves["pr"], d["rc"], d["rr"], loss_type=loss_type, beta=beta,
                                     chosen_lengths=d["nc"], rejected_lengths=d["nr"], f_divergence_type=f_type,
                                     f_alpha_divergence_coef=coef)
    pc, pr = d["pc"].clone().requires_grad_(), d["pr"].clone().requires_grad_()
    s = F_SCORES[f_type]
    ref = _f_reference(loss_type, s(pc - d["rc"], coef), s(pr - d["rr"], coef), pc, d, beta)
    assert max_rel_err(out.losses, ref) <= TOL
    for g, r in zip(torch.autograd.grad(out.loss, (leaves["pc"], leaves["pr"])),
                    torch.autograd.grad(ref.mean(), (pc, pr))):
        assert max_rel_err(g, r) <= TOL
    # rewards stay β·(ℓ − ℓʳ) whatever the transform, as TRL logs them
    assert math.isclose(out.metrics["rewards/chosen"].item(), (beta * (d["pc"] - d["rc"])).mean().item(), rel_tol=TOL)


def test_alpha_divergence_at_one_is_reverse_kl():
    d = make_inputs(0.1)
    a = pyfused_po.preference_loss(d["pc"], d["pr"], d["rc"], d["rr"], f_divergence_type="alpha_divergence",
                                   f_alpha_divergence_coef=1.0)
    b = pyfused_po.preference_loss(d["pc"], d["pr"], d["rc"], d["rr"])
    assert torch.equal(a.losses, b.losses)


def test_mpo_mix_weighting_weights_and_soft_labels():
    """MPO (sigmoid + bco_pair + sft with loss_weights), WPO weights, per-pair weights and a
    per-pair label_smoothing tensor, all at once, against the formula."""
    beta = 0.1
    d = make_inputs(beta)
    P = d["pc"].numel()
    g = torch.Generator().manual_seed(3)
    eps = torch.rand(P, generator=g, dtype=torch.float64) * 0.5
    pair_w = torch.rand(P, generator=g, dtype=torch.float64) * 2
    wc, wr = -torch.rand(P, generator=g, dtype=torch.float64), -torch.rand(P, generator=g, dtype=torch.float64)
    lw = [0.7, 0.2, 0.1]
    leaves = {k: d[k].clone().requires_grad_() for k in ("pc", "pr", "nll_s")}
    out = pyfused_po.preference_loss(
        leaves["pc"], leaves["pr"], d["rc"], d["rr"], loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=lw,
        beta=beta, chosen_lengths=d["nc"], rejected_lengths=d["nr"], nll_logps=leaves["nll_s"],
        nll_lengths=d["nll_n"], label_smoothing=eps, weights=pair_w, use_weighting=True,
        chosen_wpo_logps=wc, rejected_wpo_logps=wr)
    ref_leaves = {k: d[k].clone().requires_grad_() for k in ("pc", "pr", "nll_s")}
    rd = {**d, **ref_leaves}
    mix = (lw[0] * ref_sigmoid(rd, beta, eps)[0] + lw[1] * ref_bco_pair(rd, beta)[0] + lw[2] * ref_sft(rd, beta)[0])
    ref = mix * torch.exp(wc) * torch.exp(wr) * pair_w
    assert max_rel_err(out.losses, ref) <= TOL
    assert math.isclose(out.loss.item(), ref.mean().item(), rel_tol=TOL)
    for name, a, b in zip(leaves, torch.autograd.grad(out.loss, list(leaves.values())),
                          torch.autograd.grad(ref.mean(), list(ref_leaves.values()))):
        assert max_rel_err(a, b) <= TOL, name
    assert math.isclose(out.metrics["nll_loss"].item(), tok_mean_nll(d["nll_s"], d["nll_n"]).item(), rel_tol=TOL)
    assert math.isclose(out.metrics["wpo_weight"].item(), torch.exp(wc + wr).mean().item(), rel_tol=TOL)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(reduction):
    d = make_inputs(0.1)
    out = pyfused_po.preference_loss(d["pc"], d["pr"], d["rc"], d["rr"], loss_type="nca_pair", reduction=reduction)
    ref = ref_nca_pair(d, 0.1)[0]
    assert max_rel_err(out.loss, ref.sum() if reduction == "sum" else ref) <= TOL


def test_fp32_inputs_compute_in_fp32_and_stay_close():
    d = make_inputs(0.1)
    out = pyfused_po.preference_loss(d["pc"].float(), d["pr"].float(), d["rc"].float(), d["rr"].float(),
                                     loss_type="simpo", chosen_lengths=d["nc"].float(),
                                     rejected_lengths=d["nr"].float())
    assert out.losses.dtype == torch.float32
    assert max_rel_err(out.losses, ref_simpo(d, 0.1)[0]) <= 1e-5


def test_orpo_probability_one_is_finite():
    z = torch.zeros(2, dtype=torch.float32, requires_grad=True)
    other = torch.tensor([-1.0, -2.0], requires_grad=True)
    out = pyfused_po.preference_loss(z, other, loss_type="orpo", chosen_lengths=torch.ones(2),
                                     rejected_lengths=torch.ones(2))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(z.grad).all() and torch.isfinite(other.grad).all()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(loss_type="robust", label_smoothing=0.5), ValueError, r"label_smoothing must be in \[0.0, 0.5\)"),
    (dict(loss_type="exo_pair", label_smoothing=0.0), ValueError, "label_smoothing"),
    (dict(loss_type="sigmoid", label_smoothing=torch.tensor([0.1, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                                                            dtype=torch.float64)), ValueError, "label_smoothing"),
    (dict(loss_type="sigmoid", label_smoothing=torch.zeros(3, dtype=torch.float64)), ValueError, "one value per pair"),
    (dict(loss_type="discopop", discopop_tau=0.0), ValueError, "discopop_tau"),
    (dict(loss_type="hdpo", hdpo_alpha=-1.0), ValueError, "hdpo_alpha"),
    (dict(loss_type="simpo", gamma=1.0), TypeError, "gamma"),
    (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), ValueError, "loss_weights"),
    (dict(loss_type=["sigmoid", "sigmoid"]), ValueError, "repeat"),
    (dict(loss_type="cpo", f_divergence_type="js_divergence"), ValueError, "does not apply"),
    (dict(loss_type="sigmoid", f_divergence_type="kl"), ValueError, "f_divergence_type"),
    (dict(loss_type="sigmoid", use_weighting=True), ValueError, "chosen_wpo_logps"),
    (dict(loss_type="sigmoid", weights=torch.ones(2, dtype=torch.float64)), ValueError, "weights"),
    (dict(loss_type="bco_pair", bco_delta=torch.zeros(2)), ValueError, "bco_delta"),
    (dict(loss_type="ipo", chosen_lengths=None), ValueError, "chosen_lengths"),
])
def test_bad_input(kwargs, error, match):
    d = make_inputs(0.1)
    base = dict(chosen_lengths=d["nc"], rejected_lengths=d["nr"])
    base.update(kwargs)
    with pytest.raises(error, match=match):
        pyfused_po.preference_loss(d["pc"], d["pr"], d["rc"], d["rr"], **base)


def test_reference_free_losses_need_no_reference():
    d = make_inputs(0.1)
    for lt in ("cpo", "simpo", "alphapo", "orpo", "sft"):
        pc = d["pc"].clone()
        pc[0] = -0.3
        out = pyfused_po.preference_loss(pc, d["pr"], loss_type=lt, chosen_lengths=d["nc"],
                                         rejected_lengths=d["nr"])
        assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        pyfused_po.preference_loss(d["pc"], d["pr"], loss_type="aot")
