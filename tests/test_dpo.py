"""DPO (loss_type="sigmoid") through preference_loss and FusedPreferenceLoss vs float64 formulas."""
import math

import pytest
import torch

import pyfused_po
from reference import max_rel_err, token_logprobs_ref


def dpo_ref(pc, pr, rc, rr, beta, eps=0.0):
    """Per-pair cDPO loss written from the paper: h = β[(π_c − ref_c) − (π_r − ref_r)]."""
    h = beta * ((pc - rc) - (pr - rr))
    log_sig = lambda v: -torch.log1p(torch.exp(-v)) if v >= 0 else v - torch.log1p(torch.exp(v))  # noqa: E731
    return torch.stack([-(1 - eps) * log_sig(v) - eps * log_sig(-v) for v in h])


def random_pairs(P=6, dtype=torch.float64):
    pc, pr = -torch.rand(P, dtype=dtype) * 40, -torch.rand(P, dtype=dtype) * 40
    rc, rr = -torch.rand(P, dtype=dtype) * 40, -torch.rand(P, dtype=dtype) * 40
    pr[0] = pc[0] - rc[0] + rr[0]  # a tie: h = 0
    pc[1] = pr[1] + 500.0  # |βh| = 50 at β = 0.1
    pr[2] = pc[2] + 500.0
    return pc, pr, rc, rr


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_sigmoid_loss_metrics_and_gradients(beta, eps):
    pc, pr, rc, rr = random_pairs()
    pc.requires_grad_()
    pr.requires_grad_()
    out = pyfused_po.preference_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    ref_losses = dpo_ref(pc, pr, rc, rr, beta, eps)
    assert max_rel_err(out.losses, ref_losses) <= 1e-12
    assert math.isclose(out.loss.item(), ref_losses.mean().item(), rel_tol=1e-12)
    g = torch.autograd.grad(out.loss, (pc, pr))
    g_ref = torch.autograd.grad(ref_losses.mean(), (pc, pr))
    for a, b in zip(g, g_ref):
        assert max_rel_err(a, b) <= 1e-12
    chosen_r, rejected_r = beta * (pc - rc).detach(), beta * (pr - rr).detach()
    expected = {
        "rewards/chosen": chosen_r.mean(),
        "rewards/rejected": rejected_r.mean(),
        "rewards/accuracies": (chosen_r > rejected_r).double().mean(),
        "rewards/margins": (chosen_r - rejected_r).mean(),
        "logps/chosen": pc.detach().mean(),
        "logps/rejected": pr.detach().mean(),
    }
    for name, value in expected.items():
        assert math.isclose(out.metrics[name].item(), value.item(), rel_tol=1e-12, abs_tol=1e-12), name


def test_reductions():
    pc, pr, rc, rr = random_pairs(dtype=torch.float32)
    ref = dpo_ref(pc.double(), pr.double(), rc.double(), rr.double(), 0.1)
    none = pyfused_po.preference_loss(pc, pr, rc, rr, reduction="none")
    assert none.loss.shape == (6,) and max_rel_err(none.loss, ref) <= 1e-6
    total = pyfused_po.preference_loss(pc, pr, rc, rr, reduction="sum")
    assert math.isclose(total.loss.item(), ref.sum().item(), rel_tol=1e-6)


def test_empty_batch_gives_zero_loss():
    empty = torch.zeros(0)
    out = pyfused_po.preference_loss(empty, empty, empty, empty)
    assert out.loss.item() == 0.0


def sequence_logps_ref(logits, labels, shift):
    """Summed float64 log-probs per sequence, from the reference token log-probs."""
    return token_logprobs_ref(logits, labels, shift=shift)["logps"].sum(-1)


def make_dpo_batch(P=2, T=7, V=230, dtype=torch.float32):
    logits = (torch.randn(2 * P, T, V) * 3).to(dtype)
    ref_logits = (torch.randn(2 * P, T, V) * 3).to(dtype)
    labels = torch.randint(0, V, (2 * P, T))
    labels[:, :2] = -100  # prompt
    labels[1, 5:] = -100  # padding
    return logits, ref_logits, labels


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reference", ["ref_logits", "precomputed"])
@pytest.mark.parametrize("inplace", [False, True])
def test_fused_module_matches_the_formula(backend, dtype, reference, inplace):
    beta, shift = 0.5, True
    logits, ref_logits, labels = make_dpo_batch(dtype=dtype)
    P = labels.shape[0] // 2
    x_ref = logits.detach().double().requires_grad_()
    seq = sequence_logps_ref(x_ref, labels, shift)
    ref_seq = sequence_logps_ref(ref_logits, labels, shift)
    losses_ref = dpo_ref(seq[:P], seq[P:], ref_seq[:P], ref_seq[P:], beta)
    (grad_ref,) = torch.autograd.grad(losses_ref.mean(), x_ref)

    module = pyfused_po.FusedPreferenceLoss(beta=beta, shift=shift, backend=backend, inplace_backward=inplace)
    leaf = logits.clone().requires_grad_()
    x = leaf * 1 if inplace else leaf  # the in-place backward refuses leaf logits (an lm_head's are not)
    if reference == "ref_logits":
        out = module(logits=x, labels=labels, ref_logits=ref_logits)
    else:
        out = module(logits=x, labels=labels, ref_chosen_logps=ref_seq[:P].float(),
                     ref_rejected_logps=ref_seq[P:].float())
    out.loss.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert max_rel_err(out.losses, losses_ref) <= 1e-5
    assert max_rel_err(leaf.grad, grad_ref) <= tol
    assert math.isclose(out.metrics["logps/chosen"].item(), seq[:P].mean().item(), rel_tol=1e-5)
    assert math.isclose(out.metrics["rewards/margins"].item(),
                        (beta * ((seq[:P] - ref_seq[:P]) - (seq[P:] - ref_seq[P:]))).mean().item(),
                        rel_tol=1e-4, abs_tol=1e-5)
    mask = labels.clone()
    mask[:, 0] = -100
    z = logits.double()
    z = torch.cat([torch.zeros_like(z[:, :1]), z[:, :-1]], 1)  # shift: logits t-1 for label t
    keep = mask[:P] != -100
    assert math.isclose(out.metrics["logits/chosen"].item(), z[:P][keep].mean().item(), rel_tol=1e-4)


def test_reference_logits_get_no_gradient_and_nothing_is_saved_for_them():
    logits, ref_logits, labels = make_dpo_batch()
    ref_logits.requires_grad_()
    x = logits.clone().requires_grad_()
    out = pyfused_po.FusedPreferenceLoss(backend="triton")(logits=x, labels=labels, ref_logits=ref_logits)
    out.loss.backward()
    assert ref_logits.grad is None and x.grad is not None


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(loss_type="dpo_typo"), ValueError, "valid loss types"),
        (dict(beta=0.0), ValueError, "beta"),
        (dict(beta=-1.0), ValueError, "beta"),
        (dict(label_smoothing=0.7), ValueError, "label_smoothing"),
        (dict(simpo_gamma_typo=1.0), TypeError, "unexpected hyper-parameters"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        pyfused_po.FusedPreferenceLoss(**kwargs)


def test_bad_batches_raise_clear_errors():
    logits, ref_logits, labels = make_dpo_batch()
    module = pyfused_po.FusedPreferenceLoss(backend="torch")
    with pytest.raises(ValueError, match="even"):
        module(logits=logits[:3], labels=labels[:3], ref_logits=ref_logits[:3])
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        module(logits=logits, labels=labels)
    with pytest.raises(ValueError, match="not both"):
        module(logits=logits, labels=labels, ref_logits=ref_logits,
               ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        module(logits=logits, labels=labels, ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(2))


@pytest.mark.gpu
def test_gpu_dpo_step_matches_torch_backend():
    logits, ref_logits, labels = make_dpo_batch(P=4, T=256, V=32_000, dtype=torch.bfloat16)
    logits, ref_logits, labels = logits.cuda(), ref_logits.cuda(), labels.cuda()
    grads = {}
    for backend in ("triton", "torch"):
        x = logits.clone().requires_grad_()
        out = pyfused_po.FusedPreferenceLoss(shift=True, backend=backend)(logits=x, labels=labels, ref_logits=ref_logits)
        out.loss.backward()
        grads[backend] = (out.loss.detach(), x.grad)
    assert torch.allclose(grads["triton"][0], grads["torch"][0], rtol=1e-5)
    assert max_rel_err(grads["triton"][1], grads["torch"][1]) <= 1e-2
