"""Exact cases of the token kernels that rounding must not disturb (Triton, interpreter).

A one-entry vocabulary has p = 1: log p = 0, entropy 0, lse = z and a zero gradient,
exactly — the forward's row maximum must be the max logit as ``transform`` rounds it and
the maximum's own exponential exactly 1 (found by the linear property test through the
chunked path, whose backward recomputes p from the saved lse).  A negative
``logit_scale`` reverses the order of the logits (the forward's max key is −x).
"""
import pytest
import torch

import pyfused_po
from reference import max_rel_err, token_logprobs_ref


@pytest.mark.parametrize("logit_scale", [1.3, -1.3])
def test_one_entry_rows_are_exact(logit_scale):
    x = (torch.randn(2, 3, 1) * 5).requires_grad_()
    labels = torch.zeros(2, 3, dtype=torch.long)
    out = pyfused_po.token_logprobs(x, labels, extras=("entropy",), backend="triton",
                                    temperature=0.7, logit_scale=logit_scale)
    assert torch.equal(out.logps, torch.zeros(2, 3))
    assert torch.equal(out.entropy, torch.zeros(2, 3))
    (grad,) = torch.autograd.grad((torch.randn(2, 3) * out.logps).sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))


def test_one_entry_kl_is_exact():
    x = (torch.randn(2, 3, 1) * 5).requires_grad_()
    r = torch.randn(2, 3, 1) * 5
    labels = torch.zeros(2, 3, dtype=torch.long)
    kl = pyfused_po.token_kl(x, r, labels, backend="triton", logit_scale=1.7)
    assert torch.equal(kl, torch.zeros(2, 3))
    (grad,) = torch.autograd.grad((torch.randn(2, 3) * kl).sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))


def test_negative_logit_scale_matches_reference():
    x = torch.randn(2, 3, 301) * 3
    labels_top = x.argmin(-1)  # with a negative scale the smallest x is the top logit
    labels = torch.randint(0, 301, (2, 3))
    labels[0] = labels_top[0]
    ref = token_logprobs_ref(x.double(), labels, logit_scale=-0.8)
    out = pyfused_po.token_logprobs(x, labels, extras=("entropy", "is_top1", "mean_logit"),
                                    backend="triton", logit_scale=-0.8)
    for name in ("logps", "entropy", "is_top1", "mean_logit"):
        assert max_rel_err(getattr(out, name), ref[name]) <= 1e-5, name
    assert torch.equal(out.is_top1[0], torch.ones(3))
