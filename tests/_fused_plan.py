"""Shared check of the three-GEMM plan's tests: the fused and the staged run of one module agree."""
import torch


def assert_plans_agree(fused, g_fused, staged, g_staged, expect_fused=True):
    """``fused``/``staged``: the module's outputs with ``fused_gradient`` True/False; ``g_*`` the
    input gradients.  Float64 inputs: values to 1e-12, gradients to 1e-10 (summation order only)."""
    name = type(fused.loss.grad_fn).__name__
    assert ("StoredGradient" in name) == expect_fused, name
    assert "StoredGradient" not in type(staged.loss.grad_fn).__name__
    torch.testing.assert_close(fused.loss, staged.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused.losses, staged.losses.detach(), rtol=1e-12, atol=1e-12)
    assert fused.metrics.keys() == staged.metrics.keys()
    for k in staged.metrics:
        torch.testing.assert_close(fused.metrics[k], staged.metrics[k], rtol=1e-12, atol=1e-12, msg=k)
    for a, b in zip(g_fused, g_staged):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def run_plan(module, fused, hidden, weight, bias, labels, **kw):
    """One call of a preference ``module`` on fresh leaves with ``fused_gradient = fused`` and an
    upstream gradient of 1.7 (not 1): ``(output, [dH, dW(, db)])``."""
    module.fused_gradient = fused
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    b = None if bias is None else bias.clone().requires_grad_(True)
    out = module(hidden=h, weight=w, bias=b, labels=labels, **kw)
    (out.loss * 1.7).backward()  # an upstream gradient other than 1
    grads = [h.grad, w.grad] + ([] if b is None else [b.grad])
    return out, grads


def assert_same_plans(module, hidden, weight, bias, labels, expect_fused=True, **kw):
    """The staged and the fused run of ``module`` agree (:func:`assert_plans_agree`); the fused run."""
    staged, g_staged = run_plan(module, False, hidden, weight, bias, labels, **kw)
    fused, g_fused = run_plan(module, True, hidden, weight, bias, labels, **kw)
    assert_plans_agree(fused, g_fused, staged, g_staged, expect_fused)
    return fused, g_fused
