"""Token and KL kernels on rows that do not start on a 16-byte boundary (float64 references).

The kernels split each row into a peeled head (up to the first 16-byte boundary), an
unmasked body of whole blocks and a masked tail (``kernels/row_split.py``).  Row strides
that are not a multiple of 8 (bf16) or 4 (fp32) elements — GPT-2's V = 50,257, or a
padded stride — give every row a different head length; a storage offset shifts them
all.  Under the interpreter the block is 128 wide, so V = 300 has two body blocks and an
edge of head + tail.  −inf logits sit in the head, the body and the tail.
"""
import pytest
import torch

import pyfused_po
from pyfused_po.kernels import token_launch
from reference import max_rel_err, token_logprobs_ref, transformed_logits

EXTRAS = ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1")
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def odd_rows(B, T, V, row_stride, offset, dtype, neg_inf=()):
    """A ``[B, T, V]`` view with row stride ``row_stride`` starting ``offset`` elements into its
    storage, filled with random logits (−inf at the vocabulary indices ``neg_inf``)."""
    storage = torch.zeros(offset + B * T * row_stride, dtype=dtype)
    view = storage[offset:].as_strided((B, T, V), (T * row_stride, row_stride, 1))
    vals = torch.randn(B, T, V) * 3
    for v in neg_inf:
        vals[..., v] = -float("inf")
    view.copy_(vals.to(dtype))
    return view


def _check_logprobs(x, labels, grad_tol, **kw):
    x_ref = x.detach().clone().double().requires_grad_()
    ref = token_logprobs_ref(x_ref, labels, **kw)
    w = {n: torch.randn(labels.shape, dtype=torch.float64) for n in ("logps", "entropy")}
    (grad_ref,) = torch.autograd.grad(sum((w[n] * ref[n]).sum() for n in w), x_ref)
    xg = x.detach().requires_grad_()
    out = pyfused_po.token_logprobs(xg, labels, extras=EXTRAS, backend="triton", **kw)
    for name in ("logps", *EXTRAS):
        got = (out.logps if name == "logps" else getattr(out, name)).detach().double()
        # mean_logit is −inf on rows holding −inf logits: those must match exactly.
        fin = ref[name].isfinite()
        assert torch.equal(got[~fin], ref[name].detach()[~fin]), name
        assert max_rel_err(got[fin], ref[name].detach()[fin]) <= 1e-5, name
    (grad,) = torch.autograd.grad(sum((w[n].float() * getattr(out, n)).sum() for n in w), xg)
    finite = grad_ref.isfinite()
    assert finite.all()
    assert max_rel_err(grad, grad_ref) <= grad_tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("V,row_stride,offset", [(300, 300, 0), (301, 307, 3), (5, 7, 1)])
def test_token_logprobs_on_misaligned_rows(dtype, V, row_stride, offset):
    B, T = 2, 3
    x = odd_rows(B, T, V, row_stride, offset, dtype, neg_inf=(0, V // 2, V - 1) if V > 5 else ())
    labels = torch.randint(1, V - 1, (B, T))
    labels[0, 1] = -100
    _check_logprobs(x, labels, GRAD_TOL[dtype], shift=True, temperature=0.7, logit_scale=1.3)


def test_token_logprobs_softcap_on_misaligned_rows():
    x = odd_rows(1, 4, 203, 211, 5, torch.bfloat16)
    labels = torch.randint(0, 203, (1, 4))
    _check_logprobs(x, labels, 1e-2, softcap=4.0)


@pytest.mark.parametrize("inplace", [False, True])
def test_backward_into_a_differently_strided_gradient(inplace):
    """The gradient's rows may sit at other offsets than the logits' (no shared body
    alignment) or be the logits themselves (in place); the label's one-hot term is
    written after the loop in both cases."""
    B, T, V = 2, 3, 300
    x = odd_rows(B, T, V, 301, 1, torch.float32, neg_inf=(2, 299))
    labels = torch.randint(3, 298, (B, T))
    labels[1, 2] = -100
    x_ref = x.detach().clone().double().requires_grad_()
    g = torch.randn(B, T, dtype=torch.float64)
    (grad_ref,) = torch.autograd.grad((g * token_logprobs_ref(x_ref, labels)["logps"]).sum(), x_ref)
    kw = dict(ignore_index=-100, shift=False, temperature=1.0, logit_scale=1.0, softcap=None)
    _, lse, _ = token_launch.token_forward(x, labels, **kw)
    out = x if inplace else odd_rows(B, T, V, 309, 6, torch.float32).fill_(float("nan"))
    token_launch.token_backward(x, labels, lse, out, grad_logp=g.float(), **kw)
    assert max_rel_err(out, grad_ref) <= 1e-5
    assert torch.equal(out[1, 2], torch.zeros(V))  # the ignored row is all zeros


@pytest.mark.parametrize("same_strides", [True, False])
def test_token_kl_on_misaligned_rows(same_strides):
    B, T, V = 2, 3, 301
    x = odd_rows(B, T, V, 301, 3, torch.bfloat16, neg_inf=(0, 300))
    r = odd_rows(B, T, V, 301 if same_strides else 306, 3 if same_strides else 2, torch.bfloat16,
                 neg_inf=(0, 300))
    labels = torch.randint(1, 300, (B, T))
    labels[1, 0] = -100
    xg = x.detach().clone().requires_grad_()
    out = pyfused_po.token_kl(xg, r, labels, backend="triton", with_logps=True)
    z = transformed_logits(x.detach().double().requires_grad_())
    zr = transformed_logits(r)
    lq, lqr = torch.log_softmax(z, -1), torch.log_softmax(zr, -1)
    terms = torch.where(lqr.isfinite(), lqr.exp() * (lqr - lq), torch.zeros_like(lq))
    valid = labels != -100
    kl_ref = torch.where(valid, terms.sum(-1), torch.zeros(()))
    logp_ref = torch.where(valid, lq.gather(-1, labels.clamp(min=0)[..., None])[..., 0], torch.zeros(()))
    assert max_rel_err(out.kl, kl_ref) <= 1e-5
    assert max_rel_err(out.logps, logp_ref) <= 1e-5
    w = torch.randn(B, T, dtype=torch.float64)
    (grad_ref,) = torch.autograd.grad((w * (kl_ref + logp_ref)).sum(), z)
    (grad,) = torch.autograd.grad((w.float() * (out.kl + out.logps)).sum(), xg)
    assert max_rel_err(grad, grad_ref) <= 1e-2
