"""KTO: kto_loss vs the float64 formula, and FusedKTOLoss on logits vs kto_loss on reference sums."""
import math

import pytest
import torch

from pyfused_po.modules.kto import FusedKTOLoss, kto_loss
from reference import max_rel_err, token_logprobs_ref

TOL = 1e-11


def kto_ref(pl, rl, desirable, beta, z0, wd, wu, loss_type="kto"):
    r = pl - rl
    if loss_type == "kto":
        d = 1 - 1 / (1 + torch.exp(-beta * (r - z0)))
        u = 1 - 1 / (1 + torch.exp(-beta * (z0 - r)))
    else:
        d = 1 - 1 / (1 + torch.exp(-beta * r))
        u = 1 / (1 + torch.exp(-beta * r))
    return torch.where(desirable, wd * d, wu * u)


def inputs(B=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    pl = -torch.rand(B, generator=g, dtype=torch.float64) * 30
    rl = -torch.rand(B, generator=g, dtype=torch.float64) * 30
    pl[0] = rl[0]  # r = 0
    pl[1] = rl[1] + 250.0  # |β r| ≈ 50 at β = 0.2
    pl[2] = rl[2] - 250.0
    desirable = torch.rand(B, generator=g) > 0.4
    desirable[1], desirable[2] = True, False
    kl_p = -torch.rand(5, generator=g, dtype=torch.float64) * 20
    kl_r = -torch.rand(5, generator=g, dtype=torch.float64) * 20
    return pl, rl, desirable, kl_p, kl_r


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("kl_mode", ["logps", "scalar", "negative", "none"])
def test_kto_loss_matches_formula(loss_type, kl_mode):
    beta, wd, wu = 0.2, 1.0, 1.33
    pl, rl, desirable, kl_p, kl_r = inputs()
    kw = {"logps": dict(policy_kl_logps=kl_p, ref_kl_logps=kl_r), "scalar": dict(kl=0.8),
          "negative": dict(kl=torch.tensor(-2.0)), "none": {}}[kl_mode]
    z0 = {"logps": max((kl_p - kl_r).mean().item(), 0.0), "scalar": 0.8, "negative": 0.0, "none": 0.0}[kl_mode]
    if loss_type != "kto":
        z0 = 0.0
    x = pl.clone().requires_grad_()
    out = kto_loss(x, rl, desirable, beta=beta, desirable_weight=wd, undesirable_weight=wu,
                   loss_type=loss_type, **kw)
    xr = pl.clone().requires_grad_()
    ref = kto_ref(xr, rl, desirable, beta, z0, wd, wu, loss_type)
    assert max_rel_err(out.losses, ref) <= TOL
    assert math.isclose(out.loss.item(), ref.mean().item(), rel_tol=TOL)
    assert max_rel_err(torch.autograd.grad(out.loss, x)[0], torch.autograd.grad(ref.mean(), xr)[0]) <= TOL
    rewards = beta * (pl - rl)
    expected = {"kl": z0, "rewards/chosen_sum": rewards[desirable].sum().item(),
                "rewards/rejected_sum": rewards[~desirable].sum().item(),
                "rewards/chosen": rewards[desirable].mean().item(), "rewards/rejected": rewards[~desirable].mean().item(),
                "logps/chosen_sum": pl[desirable].sum().item(), "logps/rejected_sum": pl[~desirable].sum().item(),
                "count/chosen": float(desirable.sum()), "count/rejected": float((~desirable).sum())}
    for k, v in expected.items():
        assert math.isclose(out.metrics[k].item(), v, rel_tol=TOL, abs_tol=1e-12), k


def test_kl_estimate_is_detached():
    pl, rl, desirable, kl_p, kl_r = inputs()
    kl_p = kl_p.clone().requires_grad_()
    out = kto_loss(pl.clone().requires_grad_(), rl, desirable, policy_kl_logps=kl_p, ref_kl_logps=kl_r)
    assert not out.loss.requires_grad or torch.autograd.grad(out.loss, kl_p, allow_unused=True)[0] is None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_kto_matches_kto_loss_on_sums(backend):
    dtype = torch.float64 if backend == "torch" else torch.float32
    g = torch.Generator().manual_seed(1)
    B, T, V = 5, 7, 29
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64).to(dtype)
    ref_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100
    labels[1, 3:] = -100  # a one-token response
    desirable = torch.tensor([True, False, True, False, False])
    module = FusedKTOLoss(beta=0.3, undesirable_weight=1.5, backend=backend)
    x = logits.clone().requires_grad_()
    out = module(logits=x, labels=labels, is_desirable=desirable, ref_logits=ref_logits, kl=0.25)
    xr = logits.double().clone().requires_grad_()
    mask = labels != -100
    s = torch.where(mask, token_logprobs_ref(xr, labels)["logps"], torch.zeros(())).sum(-1)
    rs = torch.where(mask, token_logprobs_ref(ref_logits.double(), labels)["logps"], torch.zeros(())).sum(-1)
    ref = kto_ref(s, rs, desirable, 0.3, 0.25, 1.0, 1.5)
    tol = 1e-10 if backend == "torch" else 1e-5
    assert max_rel_err(out.losses, ref) <= tol
    g1 = torch.autograd.grad(out.loss, x)[0]
    g2 = torch.autograd.grad(ref.mean(), xr)[0]
    assert max_rel_err(g1, g2) <= tol


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(loss_type="bco"), ValueError, "loss_type"),
    (dict(kl=1.0, policy_kl_logps=torch.zeros(2, dtype=torch.float64), ref_kl_logps=torch.zeros(2, dtype=torch.float64)),
     ValueError, "not both"),
    (dict(policy_kl_logps=torch.zeros(2, dtype=torch.float64)), ValueError, "together"),
    (dict(beta=0.0), ValueError, "beta"),
    (dict(kl=torch.zeros(3)), ValueError, "kl must be"),
])
def test_kto_bad_input(kwargs, error, match):
    pl, rl, desirable, _, _ = inputs()
    with pytest.raises(error, match=match):
        kto_loss(pl, rl, desirable, **kwargs)
    with pytest.raises(TypeError, match="is_desirable"):
        kto_loss(pl, rl, desirable.long())
