"""The three-GEMM plan with a loss that differentiates the entropy too (GRPO's entropy bonus):
``FusedHead(grad_extras=("entropy",))`` through ``trl_fused_step.policy_step``.  Loss, per-token
values and the gradients of the hidden states and the head against a float64 reference written
from the formulas (log-softmax and H = −Σ p log p by autograd), on both fold backends, with the
LM head's GEMMs counted: 3 per labelled token."""
import pytest
import torch

from pyfused_po.integrations.trl_fused_step import policy_step
from test_integration_trl_dpo_plan import _HeadFlops

V, D, ROWS, T = 40, 12, 3, 5
TEMPERATURE = 0.7


def _case():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(ROWS, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / 2
    labels = torch.randint(0, V, (ROWS, T), generator=g)
    labels[0, :2] = -100
    labels[2, 4] = -100
    a = torch.randn(ROWS, T, generator=g, dtype=torch.float64)  # per-token weights of log p
    b = torch.randn(ROWS, T, generator=g, dtype=torch.float64)  # and of H
    return hidden, weight, labels, a, b


def _loss(logps, entropy, labels, a, b):
    """A per-row separable loss: a row-normalized Σ a·log p minus a batch-normalized Σ b·H."""
    mask = (labels != -100).double()
    per_row = (a * logps * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_row.mean() - (b * entropy * mask).sum() / mask.sum()


def _reference(hidden, weight, labels, a, b):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logq = torch.log_softmax((h @ w.t()) / TEMPERATURE, dim=-1)
    safe = labels.clamp(min=0)
    logps = logq.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * (labels != -100)
    entropy = -(logq.exp() * logq).sum(-1)
    loss = _loss(logps, entropy, labels, a, b)
    loss.backward()
    return loss.detach(), logps.detach(), entropy.detach(), h.grad, w.grad


@pytest.mark.parametrize("backend, dtype, tol", [("torch", torch.float64, 1e-10), ("triton", torch.float32, 2e-5)])
def test_entropy_gradient_on_the_plan_matches_float64(backend, dtype, tol):
    """The Triton fold computes in float32 (its inputs fp32), the torch fold in float64."""
    hidden, weight, labels, a, b = _case()
    ref_loss, ref_logps, ref_entropy, ref_dh, ref_dw = _reference(hidden, weight, labels, a, b)
    h, w = hidden.to(dtype).requires_grad_(True), weight.to(dtype).requires_grad_(True)
    token_kwargs = dict(ignore_index=-100, shift=False, temperature=TEMPERATURE, logit_scale=1.0, softcap=None,
                        backend=backend)
    counter = _HeadFlops(V)
    with counter:
        loss, tokens = policy_step((h, w, None), labels,
                                   lambda t: _loss(t.logps.double(), t.entropy.double(), labels, a, b),
                                   token_kwargs, grad_extras=("entropy",))
        loss.backward()
    labelled = int((labels != -100).sum())
    assert counter.flops == 3 * labelled * 2 * V * D  # the plan ran: no recompute
    close = dict(rtol=tol, atol=tol, check_dtype=False)
    torch.testing.assert_close(loss.detach(), ref_loss, **close)
    mask = labels != -100
    torch.testing.assert_close(tokens.logps[mask], ref_logps[mask], **close)
    torch.testing.assert_close(tokens.entropy[mask], ref_entropy[mask], **close)
    torch.testing.assert_close(h.grad, ref_dh, **close)
    torch.testing.assert_close(w.grad, ref_dw, **close)


def test_unknown_grad_extra_is_refused_by_name():
    hidden, weight, labels, _, _ = _case()
    token_kwargs = dict(ignore_index=-100, shift=False, temperature=1.0, logit_scale=1.0, softcap=None,
                        backend="torch")
    with pytest.raises(ValueError, match="grad_extras.*mean_logit"):
        policy_step((hidden.requires_grad_(True), weight, None), labels, lambda t: t.logps.sum(), token_kwargs,
                    grad_extras=("mean_logit",))
