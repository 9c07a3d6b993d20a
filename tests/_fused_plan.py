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
