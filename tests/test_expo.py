"""EXPO: −log σ(ℓ_w − ℓ_l) + λ·½(KL_w + KL_l), against float64 formulas written here."""
import math

import pytest
import torch

import pyfused_po
from pyfused_po.modules.expo import expo_from_logits, expo_loss


def log_sigmoid64(x):
    # log σ(x) = −log(1 + e^{−x}), written stably for either sign of x.
    return torch.where(x >= 0, -torch.log1p(torch.exp(-x)), x - torch.log1p(torch.exp(x)))


def expo_ref_from_sums(lw, ll, kw, kl, lam):
    """Per-pair float64 EXPO losses from sequence sums."""
    return -log_sigmoid64(lw - ll) + lam * 0.5 * (kw + kl)


def expo_ref_from_logits(logits, ref_logits, labels, lam, *, shift=False, temperature=1.0,
                         softcap=None):
    """float64 EXPO straight from the definition: log-softmaxes over the full vocabulary,
    token KLs and log-probs summed along each response, pairs laid out [chosen; rejected]."""
    def z_of(x):
        z = x.double()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return z / temperature

    log_p = torch.log_softmax(z_of(logits), -1)
    log_pr = torch.log_softmax(z_of(ref_logits), -1)
    targets, valid = labels, labels != -100
    if shift:
        log_p, log_pr = log_p[:, :-1], log_pr[:, :-1]
        targets, valid = labels[:, 1:], valid[:, 1:]
    tok_lp = log_p.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    tok_kl = (log_pr.exp() * (log_pr - log_p)).sum(-1)
    seq_lp = (tok_lp * valid).sum(-1)
    seq_kl = (tok_kl * valid).sum(-1)
    P = labels.shape[0] // 2
    return expo_ref_from_sums(seq_lp[:P], seq_lp[P:], seq_kl[:P], seq_kl[P:], lam)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shift", [False, True])
def test_expo_from_logits_matches_definition(backend, shift):
    P, T, V = 2, 6, 157
    logits = torch.randn(2 * P, T, V) * 2
    ref_logits = torch.randn(2 * P, T, V) * 2
    labels = torch.randint(0, V, (2 * P, T))
    labels[:, :2] = -100  # prompt
    labels[1, 4:] = -100  # padding
    lam = 0.3
    x = logits.clone().requires_grad_()
    out = expo_from_logits(x, ref_logits, labels, expo_lambda=lam, shift=shift, backend=backend,
                           temperature=0.9, softcap=6.0)
    x64 = logits.double().requires_grad_()
    losses = expo_ref_from_logits(x64, ref_logits, labels, lam, shift=shift, temperature=0.9, softcap=6.0)
    assert out.losses.shape == (P,)
    assert torch.allclose(out.losses.double(), losses, rtol=1e-5, atol=1e-5)
    assert math.isclose(out.loss.item(), losses.mean().item(), rel_tol=1e-5)
    (grad,) = torch.autograd.grad(out.loss, x)
    (grad64,) = torch.autograd.grad(losses.mean(), x64)
    assert (grad.double() - grad64).abs().max().item() <= 1e-5 * grad64.abs().max().item()
    assert float(out.metrics["expo/kl"]) > 0


def test_expo_from_logits_reference_gets_no_gradient():
    logits = torch.randn(2, 4, 60, requires_grad=True)
    ref_logits = torch.randn(2, 4, 60, requires_grad=True)
    labels = torch.randint(0, 60, (2, 4))
    expo_from_logits(logits, ref_logits, labels, backend="torch").loss.backward()
    assert ref_logits.grad is None and logits.grad is not None


@pytest.mark.parametrize("lam", [0.0, 0.1, 2.0])
def test_expo_loss_values_metrics_and_gradients(lam):
    # Ties, large margins (|ℓ_w − ℓ_l| ≈ 50) and ordinary ones.
    lw = torch.tensor([-3.0, -10.0, -1.0, -60.0, -5.5], dtype=torch.float64)
    ll = torch.tensor([-3.0, -60.0, -51.0, -10.0, -2.0], dtype=torch.float64)
    kw = torch.tensor([0.2, 1.5, 0.0, 3.0, 0.01], dtype=torch.float64)
    kl = torch.tensor([0.4, 0.5, 0.7, 0.0, 2.0], dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (lw, ll, kw, kl)]
    out = expo_loss(*inputs, expo_lambda=lam)
    refs = [t.clone().requires_grad_() for t in (lw, ll, kw, kl)]
    losses = expo_ref_from_sums(*refs, lam)
    assert torch.allclose(out.losses, losses, rtol=1e-12, atol=1e-12)
    assert abs(out.loss.item() - losses.mean().item()) <= 1e-12
    assert out.losses[0].item() == pytest.approx(math.log(2) + lam * 0.3, rel=1e-12)  # tie
    grads = torch.autograd.grad(out.loss, inputs)
    grads_ref = torch.autograd.grad(losses.mean(), refs)
    for g, r in zip(grads, grads_ref):
        assert torch.allclose(g, r, rtol=1e-12, atol=1e-14)
    # Closed form of the BT gradient: ∂/∂ℓ_w = −σ(ℓ_l − ℓ_w)/P.
    expected = -torch.sigmoid(ll - lw) / len(lw)
    assert torch.allclose(grads[0], expected, rtol=1e-12, atol=1e-14)
    m = out.metrics
    assert m["rewards/accuracies"].item() == pytest.approx(2 / 5)
    assert m["rewards/margins"].item() == pytest.approx((lw - ll).mean().item())
    assert m["expo/bt_loss"].item() == pytest.approx((-log_sigmoid64(lw - ll)).mean().item())


def test_expo_loss_float32_and_reductions():
    lw, ll, kw, kl = torch.randn(4, 6) * 5
    kw, kl = kw.abs(), kl.abs()
    ref = expo_ref_from_sums(lw.double(), ll.double(), kw.double(), kl.double(), 0.5)
    for reduction, expected in (("sum", ref.sum()), ("none", ref), ("mean", ref.mean())):
        out = expo_loss(lw, ll, kw, kl, expo_lambda=0.5, reduction=reduction)
        assert out.loss.dtype == torch.float32
        assert torch.allclose(out.loss.double(), expected, rtol=1e-6, atol=1e-6)


def test_registered_in_preference_loss():
    assert "expo" in pyfused_po.loss_types()
    lw, ll = torch.tensor([-2.0, -4.0]), torch.tensor([-3.0, -1.0])
    # λ = 0 is the plain Bradley–Terry loss: no reference and no KL needed; β is ignored.
    out = pyfused_po.preference_loss(lw, ll, loss_type="expo", beta=0.7, expo_lambda=0.0)
    expected = -log_sigmoid64((lw - ll).double()).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # λ > 0 needs the per-sequence KL, which says where to get it.
    with pytest.raises(ValueError, match="chosen_kl"):
        pyfused_po.preference_loss(lw, ll, loss_type="expo", expo_lambda=0.5)


def test_bad_inputs():
    t = torch.zeros(3)
    for bad in (-0.1, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ValueError, match="expo_lambda"):
            expo_loss(t, t, t, t, expo_lambda=bad)
    with pytest.raises(ValueError, match="chosen_kl must have shape"):
        expo_loss(t, t, torch.zeros(2), t)
    with pytest.raises(ValueError, match="reduction"):
        expo_loss(t, t, t, t, reduction="avg")
    with pytest.raises(ValueError, match="even"):
        expo_from_logits(torch.zeros(3, 2, 5), torch.zeros(3, 2, 5), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="ref_logits must have the shape"):
        expo_from_logits(torch.zeros(2, 2, 5), torch.zeros(2, 2, 4), torch.zeros(2, 2, dtype=torch.long))
