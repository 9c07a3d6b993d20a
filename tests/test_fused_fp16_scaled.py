"""Issue 26, class 2: the stored-gradient plans (three GEMMs, frozen head) on fp16 inputs under a
loss scale, as ``GradScaler`` applies it: ``(loss * 65536).backward()``.

Before the fix the plan formed ``G = ∂L/∂X`` (and the stored dH, dW) in fp16 before the upstream
scale was known: the LM-head rows of unlikely tokens, whose gradient is below fp16's smallest
subnormal until scaled, came out exactly 0.  The reference is written here from the formula in
float64 (logits, log-softmax, sums, DPO / KTO loss), scaled, then compared after the unscale."""
import pytest
import torch
import torch.nn.functional as F

from pyfused_po import FusedKTOLoss, FusedPreferenceLoss

P, T, V, D = 2, 6, 96, 8
SCALE = 65536.0
BETA = 1e-5  # a small loss gradient (a small β, or many pairs): dH and dW are fp16 subnormals unscaled


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * P, T, D, generator=g, dtype=torch.float64)
    # Logits with a spread of ~25 nats: many vocabulary rows have p between 1e-12 and 1e-5.
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * 3.2
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    labels[:, :2] = -100
    ref = torch.randn(2 * P, generator=g, dtype=torch.float64) - 30
    return hidden.half(), weight.half(), labels, ref


def _sums64(hidden, weight, labels):
    logits = hidden.double() @ weight.double().t()
    logp = F.log_softmax(logits, -1)
    mask = labels != -100
    tok = torch.gather(logp, -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, tok, torch.zeros_like(tok)).sum(-1)


def _dpo64(hidden, weight, labels, ref, beta):
    s = _sums64(hidden, weight, labels)
    margin = (s[:P] - ref[:P]) - (s[P:] - ref[P:])
    return -F.logsigmoid(beta * margin).mean()


def _kto64(hidden, weight, labels, ref, beta, desirable, kl):
    r = _sums64(hidden, weight, labels) - ref
    losses = torch.where(desirable, 1 - torch.sigmoid(beta * (r - kl)), 1 - torch.sigmoid(beta * (kl - r)))
    return losses.mean()


def _reference_grads(loss_fn, hidden, weight):
    h = hidden.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    loss_fn(h, w).backward()
    return h.grad, w.grad


def _run(module, fused, hidden, weight, trainable, **kw):
    module.fused_gradient = fused
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(trainable)
    out = module(hidden=h, weight=w, **kw)
    (out.loss * SCALE).backward()
    return out, h.grad.double() / SCALE, None if w.grad is None else w.grad.double() / SCALE


def _check(fused_grad, staged_grad, reference):
    """Fused: no more exactly-zero rows than the staged plan, and within the staged plan's error."""
    zero_fused = int((fused_grad.abs().sum(-1) == 0).sum())
    zero_staged = int((staged_grad.abs().sum(-1) == 0).sum())
    assert zero_fused <= zero_staged, (zero_fused, zero_staged)
    err = (fused_grad - reference).norm() / reference.norm()
    err_staged = (staged_grad - reference).norm() / reference.norm()
    assert err <= 2 * err_staged, (float(err), float(err_staged))


@pytest.mark.parametrize("trainable", [True, False])
def test_preference_plan_keeps_small_gradients_under_loss_scale(trainable):
    hidden, weight, labels, ref = _batch()
    module = FusedPreferenceLoss("sigmoid", beta=BETA, backend="torch", logit_metrics=False)
    kw = dict(labels=labels, ref_chosen_logps=ref[:P].half(), ref_rejected_logps=ref[P:].half())
    fused, gh_f, gw_f = _run(module, True, hidden, weight, trainable, **kw)
    assert "StoredGradient" in type(fused.loss.grad_fn).__name__ or not trainable
    _, gh_s, gw_s = _run(module, False, hidden, weight, trainable, **kw)
    ref_h, ref_w = _reference_grads(lambda h, w: _dpo64(h, w, labels, ref.half().double(), BETA), hidden, weight)
    _check(gh_f.reshape(-1, D), gh_s.reshape(-1, D), ref_h.reshape(-1, D))
    if trainable:
        _check(gw_f, gw_s, ref_w)


def test_kto_plan_keeps_small_gradients_under_loss_scale():
    hidden, weight, labels, ref = _batch(seed=1)
    desirable = torch.tensor([True, False, True, False])
    module = FusedKTOLoss(beta=BETA, backend="torch")
    kw = dict(labels=labels, is_desirable=desirable, ref_logps=ref.half(), kl=0.2)
    fused, gh_f, gw_f = _run(module, True, hidden, weight, True, **kw)
    assert "StoredGradient" in type(fused.loss.grad_fn).__name__
    _, gh_s, gw_s = _run(module, False, hidden, weight, True, **kw)
    ref_h, ref_w = _reference_grads(
        lambda h, w: _kto64(h, w, labels, ref.half().double(), BETA, desirable, 0.2), hidden, weight)
    _check(gh_f.reshape(-1, D), gh_s.reshape(-1, D), ref_h.reshape(-1, D))
    _check(gw_f, gw_s, ref_w)
