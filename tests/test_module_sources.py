"""FusedPreferenceLoss from hidden states + LM head equals the logits path; EXPO through
the module equals its definition."""
import math

import pytest
import torch
import torch.nn.functional as F

import pyfused_po
from pyfused_po.objectives import get_objective
from reference import max_rel_err, token_logprobs_ref

P, T, D, V = 2, 6, 24, 130


def make_inputs(dtype=torch.float32, bias=True):
    hidden = torch.randn(2 * P, T, D).to(dtype)
    weight = (torch.randn(V, D) / math.sqrt(D) * 3).to(dtype)
    b = (torch.randn(V) * 0.5).to(dtype) if bias else None
    ref_hidden = torch.randn(2 * P, T, D).to(dtype)
    labels = torch.randint(0, V, (2 * P, T))
    labels[:, :2] = -100
    labels[0, -1] = -100
    return hidden, weight, b, ref_hidden, labels


def logits_of(hidden, weight, bias):
    out = hidden @ weight.t()
    return out if bias is None else out + bias


@pytest.mark.parametrize("backend, impl", [("torch", "auto"), ("triton", "chunked"), ("triton", "fused")])
@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
@pytest.mark.parametrize("frozen_head", [False, True])
def test_hidden_path_equals_logits_path(backend, impl, loss_type, frozen_head):
    hidden, weight, bias, ref_hidden, labels = make_inputs()
    kwargs = dict(loss_type=loss_type, beta=0.2, shift=True, softcap=5.0, backend=backend)
    results = {}
    for path in ("logits", "hidden"):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(not frozen_head)
        b = bias.clone().requires_grad_()
        refs = {} if loss_type == "simpo" else (
            dict(ref_logits=logits_of(ref_hidden, weight, bias)) if path == "logits" else dict(ref_hidden=ref_hidden))
        if path == "logits":
            module = pyfused_po.FusedPreferenceLoss(**kwargs)
            out = module(logits=logits_of(h, w, b), labels=labels, **refs)
        else:
            module = pyfused_po.FusedPreferenceLoss(linear_impl=impl, **kwargs)
            out = module(hidden=h, weight=w, bias=b, labels=labels, **refs)
        out.loss.backward()
        results[path] = (out, h.grad, w.grad, b.grad)
    (a, ah, aw, ab), (c, ch, cw, cb) = results["logits"], results["hidden"]
    assert max_rel_err(c.losses, a.losses) <= 1e-5
    assert max_rel_err(ch, ah) <= 1e-5
    assert max_rel_err(cb, ab) <= 1e-5
    if frozen_head:
        assert aw is None and cw is None
    else:
        assert max_rel_err(cw, aw) <= 1e-5
    for name in ("rewards/margins", "logps/chosen", "logits/chosen"):
        assert math.isclose(c.metrics[name].item(), a.metrics[name].item(), rel_tol=1e-5, abs_tol=1e-6), name


@pytest.mark.parametrize("loss_type", sorted(set(pyfused_po.loss_types()) - {"expo"}))
def test_every_loss_on_the_hidden_path_equals_the_logits_path(loss_type):
    """Per loss type: the fused-linear module gives the logits module's losses and gradients."""
    hidden, weight, bias, ref_hidden, labels = make_inputs(dtype=torch.float64)
    results = []
    for path in ("logits", "hidden"):
        h = hidden.clone().requires_grad_()
        refs = {}
        if get_objective(loss_type).needs_reference:
            refs = dict(ref_logits=logits_of(ref_hidden, weight, bias)) if path == "logits" else \
                dict(ref_hidden=ref_hidden)
        module = pyfused_po.FusedPreferenceLoss(loss_type, beta=0.3, shift=True, backend="torch")
        if path == "logits":
            out = module(logits=logits_of(h, weight, bias), labels=labels, **refs)
        else:
            out = module(hidden=h, weight=weight, bias=bias, labels=labels, **refs)
        out.loss.backward()
        results.append((out, h.grad))
    (a, ga), (b, gb) = results
    assert max_rel_err(b.losses, a.losses) <= 1e-10
    assert max_rel_err(gb, ga) <= 1e-10
    for name in a.metrics:
        assert math.isclose(b.metrics[name].item(), a.metrics[name].item(), rel_tol=1e-9, abs_tol=1e-12), name


def test_reference_head_defaults_to_the_policy_head_and_gets_no_gradient():
    hidden, weight, bias, ref_hidden, labels = make_inputs(bias=False)
    w = weight.clone().requires_grad_()
    module = pyfused_po.FusedPreferenceLoss(backend="torch")
    shared = module(hidden=hidden, weight=w, labels=labels, ref_hidden=ref_hidden)
    explicit = module(hidden=hidden, weight=w, labels=labels, ref_hidden=ref_hidden, ref_weight=weight)
    assert torch.equal(shared.losses, explicit.losses)
    ref_hidden.requires_grad_()
    module(hidden=hidden, weight=w, labels=labels, ref_hidden=ref_hidden).loss.backward()
    assert ref_hidden.grad is None and w.grad is not None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "exactly one of logits= or hidden="),
        (dict(logits=torch.zeros(4, 6, 130), hidden=torch.zeros(4, 6, 24)), "exactly one"),
        (dict(hidden=torch.zeros(4, 6, 24)), "needs weight="),
        (dict(logits=torch.zeros(4, 6, 130), weight=torch.zeros(130, 24)), "go with hidden="),
        (dict(logits=torch.zeros(4, 6, 130), ref_weight=torch.zeros(130, 24)), "go with ref_hidden="),
    ],
)
def test_source_errors(kwargs, match):
    labels = torch.randint(0, V, (2 * P, T))
    with pytest.raises(ValueError, match=match):
        pyfused_po.FusedPreferenceLoss(backend="torch")(labels=labels, **kwargs)


def expo_reference(logits, ref_logits, labels, lam, shift):
    """−log σ(ℓ_w − ℓ_l) + λ·½(KL_w + KL_l) in float64, from full distributions."""
    logps = token_logprobs_ref(logits, labels, shift=shift)["logps"].sum(-1)
    z, zr = logits.double(), ref_logits.double()
    if shift:
        z = torch.cat([torch.zeros_like(z[:, :1]), z[:, :-1]], 1)
        zr = torch.cat([torch.zeros_like(zr[:, :1]), zr[:, :-1]], 1)
    mask = labels != -100
    if shift:
        mask[:, 0] = False
    lq, lqr = torch.log_softmax(z, -1), torch.log_softmax(zr, -1)
    kl = (lqr.exp() * (lqr - lq)).sum(-1)
    kl = torch.where(mask, kl, torch.zeros_like(kl)).sum(-1)
    half = labels.shape[0] // 2
    bt = -F.logsigmoid(logps[:half] - logps[half:])
    return bt + lam * 0.5 * (kl[:half] + kl[half:])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_expo_through_the_module(backend):
    logits = torch.randn(2 * P, T, V) * 2
    ref_logits = logits + 0.5 * torch.randn(2 * P, T, V)
    labels = torch.randint(0, V, (2 * P, T))
    labels[:, :2] = -100
    x = logits.clone().requires_grad_()
    out = pyfused_po.FusedPreferenceLoss("expo", expo_lambda=0.3, shift=True, backend=backend)(
        logits=x, labels=labels, ref_logits=ref_logits)
    out.loss.backward()
    xr = logits.double().requires_grad_()
    ref = expo_reference(xr, ref_logits, labels, 0.3, True)
    ref.mean().backward()
    assert max_rel_err(out.losses, ref) <= 1e-5
    assert max_rel_err(x.grad, xr.grad) <= 1e-5


def test_expo_configuration_errors():
    with pytest.raises(ValueError, match="inplace_backward"):
        pyfused_po.FusedPreferenceLoss("expo", inplace_backward=True)
    module = pyfused_po.FusedPreferenceLoss("expo", backend="torch")
    labels = torch.randint(0, V, (2 * P, T))
    with pytest.raises(ValueError, match="ref_logits="):
        module(logits=torch.randn(2 * P, T, V), labels=labels)


@pytest.mark.parametrize("loss_type", sorted(set(pyfused_po.loss_types()) - {"expo"}))
def test_every_loss_through_the_module_equals_preference_loss_on_reference_sums(loss_type):
    """The module's three stages against preference_loss fed float64 sums computed here
    from the formula (log-softmax of the full logits), loss, metrics and logits gradient."""
    torch.manual_seed(1)
    logits = torch.randn(2 * P, T, V, dtype=torch.float64) * 2
    ref_logits = torch.randn(2 * P, T, V, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (2 * P, T))
    labels[:, :2] = -100
    labels[1, -2:] = -100
    needs_ref = get_objective(loss_type).needs_reference
    x = logits.clone().requires_grad_()
    module = pyfused_po.FusedPreferenceLoss(loss_type, beta=0.3, shift=True, backend="torch", logit_metrics=False)
    out = module(logits=x, labels=labels, **(dict(ref_logits=ref_logits) if needs_ref else {}))
    out.loss.backward()

    x_ref = logits.clone().requires_grad_()
    tok = token_logprobs_ref(x_ref, labels, shift=True)["logps"]
    mask = labels != -100
    mask[:, 0] = False
    sums, lengths = tok.sum(-1), mask.sum(-1).double()
    ref_sums = token_logprobs_ref(ref_logits, labels, shift=True)["logps"].sum(-1)
    refs = (ref_sums[:P], ref_sums[P:]) if needs_ref else (None, None)
    expected = pyfused_po.preference_loss(sums[:P], sums[P:], *refs, loss_type=loss_type, beta=0.3,
                                          chosen_lengths=lengths[:P], rejected_lengths=lengths[P:])
    expected.loss.backward()
    assert max_rel_err(out.losses, expected.losses) <= 1e-10
    assert max_rel_err(x.grad, x_ref.grad) <= 1e-10
    assert set(out.metrics) == set(expected.metrics)
    for name in expected.metrics:
        assert math.isclose(out.metrics[name].item(), expected.metrics[name].item(), rel_tol=1e-9, abs_tol=1e-12), name
