"""Offsets past 2³¹ elements, without the memory: rows placed ~2³⁰ elements apart.

The storage is allocated with ``torch.empty`` and never filled: only the pages of the
few rows the kernels touch are committed, so a 4 GB (virtual) buffer costs kilobytes.
The row stride fits in int32, so ``program_id · stride`` overflows unless the kernel
widens it to int64 first — exactly the bug these tests catch.
"""
import math

import pytest
import torch

import pyfused_po
from reference import max_rel_err, token_logprobs_ref

STRIDE = 2**30 + 7  # int32-representable; the third row starts past element 2³¹
ROWS = 3


def far_apart_rows(width, dtype, device="cpu"):
    """A [1, ROWS, width] view whose rows sit STRIDE elements apart in a lazily-committed buffer."""
    storage = torch.empty((ROWS - 1) * STRIDE + width, dtype=dtype, device=device)
    view = storage.as_strided((1, ROWS, width), (0, STRIDE, 1))
    for r in range(ROWS):
        view[0, r] = (torch.randn(width) * 2).to(dtype)
    return view


class _NonLeafAlias(torch.autograd.Function):
    """A non-leaf tensor on the same memory as its input (identity backward)."""

    @staticmethod
    def forward(ctx, t):
        return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(),
                                                                    t.shape, t.stride())

    @staticmethod
    def backward(ctx, grad):
        return grad


def _big_buffers_allowed():
    return not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory > 16 * 2**30


pytestmark = pytest.mark.skipif(not _big_buffers_allowed(), reason="needs 4.3 GB of address space")


def test_token_kernels_address_rows_past_2_pow_31():
    V = 97
    logits = far_apart_rows(V, torch.bfloat16)
    assert (ROWS - 1) * STRIDE > 2**31
    labels = torch.tensor([[5, 60, 96]])
    x_ref = logits.detach().clone().double().requires_grad_()
    ref = token_logprobs_ref(x_ref, labels)
    g = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    (grad_ref,) = torch.autograd.grad((g * ref["logps"]).sum(), x_ref)
    x = logits.requires_grad_()
    out = pyfused_po.token_logprobs(x, labels, extras=("entropy",), backend="triton")
    assert max_rel_err(out.logps, ref["logps"]) <= 1e-5
    assert max_rel_err(out.entropy, ref["entropy"]) <= 1e-5
    (grad,) = torch.autograd.grad((g.float() * out.logps).sum(), x)
    assert max_rel_err(grad, grad_ref) <= 1e-2


def test_inplace_backward_writes_rows_past_2_pow_31():
    V = 97
    x = far_apart_rows(V, torch.bfloat16)
    labels = torch.tensor([[5, 60, 96]])
    x_ref = x.detach().clone().double().requires_grad_()
    (grad_ref,) = torch.autograd.grad(token_logprobs_ref(x_ref, labels)["logps"].sum(), x_ref)
    # The in-place backward refuses leaf logits; an lm_head's output is a non-leaf on its own memory.
    x = _NonLeafAlias.apply(x.requires_grad_())
    out = pyfused_po.token_logprobs(x, labels, inplace_backward=True, backend="triton")
    out.sum().backward()
    # The gradient now lives in the far-apart rows of the storage itself.
    assert max_rel_err(x.detach(), grad_ref) <= 1e-2


def test_fused_linear_kernels_address_hidden_rows_past_2_pow_31():
    D, V = 20, 70
    hidden = far_apart_rows(D, torch.float32)[0]  # [ROWS, D], row stride STRIDE
    weight = torch.randn(V, D) / math.sqrt(D)
    labels = torch.tensor([3, 40, 69])
    h = hidden.requires_grad_()
    w = weight.clone().requires_grad_()
    out = pyfused_po.linear_token_logprobs(h, w, labels, backend="triton", impl="fused")
    out.sum().backward()
    h_ref = hidden.detach().clone().double().requires_grad_()
    w_ref = weight.double().requires_grad_()
    ref = torch.log_softmax(h_ref @ w_ref.t(), -1).gather(-1, labels[:, None]).squeeze(-1)
    ref.sum().backward()
    assert max_rel_err(out, ref) <= 1e-5
    assert max_rel_err(h.grad, h_ref.grad) <= 1e-5
    assert max_rel_err(w.grad, w_ref.grad) <= 1e-5


def test_kl_kernels_address_rows_past_2_pow_31():
    V = 97
    logits = far_apart_rows(V, torch.float32)
    ref_logits = far_apart_rows(V, torch.float32)
    labels = torch.tensor([[5, 60, 96]])
    x = logits.requires_grad_()
    out = pyfused_po.token_kl(x, ref_logits, labels, backend="triton")
    (grad,) = torch.autograd.grad(out.sum(), x)
    x_ref = logits.detach().clone().double().requires_grad_()
    lq = torch.log_softmax(x_ref, -1)
    lqr = torch.log_softmax(ref_logits.detach().double(), -1)
    kl = (lqr.exp() * (lqr - lq)).sum(-1)
    (grad_ref,) = torch.autograd.grad(kl.sum(), x_ref)
    assert max_rel_err(out, kl) <= 1e-5
    assert max_rel_err(grad, grad_ref) <= 1e-5
