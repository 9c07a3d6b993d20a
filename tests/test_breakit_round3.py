"""Break-it round 3: the exact (hi, lo) LSE pair and the fused plans, at the edges.

Each test fails on the code before its fix (named in the test's docstring); references are
float64 ``log_softmax`` / autograd on the same fp32 inputs, written from the formula.

Tolerances: 4e-6 absolute on log-probs, KL and entropy (fp32 math on numbers of size log V,
as ``tests/test_lse_offset.py``), 2e-6 on logits gradients, 1e-5 relative on the fused-linear
parameter gradients (fp32 GEMMs of D = 8).
"""
import pytest
import torch

import pyfused_po

from _fake_vocab_ranks import Recorded, fake_ranks

V = 150  # not a multiple of the interpreter's 128-wide block
TOL = 4e-6
GRAD_TOL = 2e-6


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def logits(shape, seed, offset=0.0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * spread + offset).float()


# --- token_kl: reference and policy at different offsets -----------------------------------------

@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("ref_offset,temperature", [(1e2, 1.0), (1e4, 0.7), (1e5, 1.0), (-1e5, 0.7)])
def test_token_kl_with_the_reference_at_another_offset(backend, ref_offset, temperature):
    """KL(π_ref ‖ π_θ) is invariant to a per-row offset of either model's logits.  The Triton
    forward summed p_ref·(zr − z), each term rounded to the ulp of the gap between the two
    offsets, and added back (m − mr): KL error 1.5e-5 at a gap of 100, 1e-3 at 1e4, 1.2e-2 at
    1e5 (the torch backend was exact)."""
    x = logits((2, 3, V), seed=1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    r = (x.double() + 0.5 * noise + ref_offset).float()
    y = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(3))
    x64 = x.double().requires_grad_()
    lq = torch.log_softmax(x64 / temperature, -1)
    lqr = torch.log_softmax(r.double() / temperature, -1)
    kl_ref = (lqr.exp() * (lqr - lq)).sum(-1)
    (grad_ref,) = torch.autograd.grad(kl_ref.sum(), x64)

    xx = x.clone().requires_grad_()
    out = pyfused_po.token_kl(xx, r, y, temperature=temperature, backend=backend)
    kl = out if torch.is_tensor(out) else out.kl
    (grad,) = torch.autograd.grad(kl.sum(), xx)
    assert max_err(kl, kl_ref) <= TOL
    assert max_err(grad, grad_ref) <= GRAD_TOL / temperature


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_token_kl_with_masked_entries_at_another_offset(backend):
    """Both models mask the same ids with −inf (p_ref = 0 there) and sit 1e4 apart."""
    x = logits((2, 3, V), seed=4)
    r = (x.double() + 1e4).float()
    x[..., 100:] = -float("inf")
    r[..., 100:] = -float("inf")
    y = torch.randint(0, 100, (2, 3), generator=torch.Generator().manual_seed(5))
    out = pyfused_po.token_kl(x, r, y, backend=backend)
    kl = out if torch.is_tensor(out) else out.kl
    # The same distribution shifted: KL = 0.
    assert kl.abs().max().item() <= TOL


# --- fused linear: exact at any temperature and scale, −inf bias ---------------------------------

def dyadic_head(offset, N=7, D=8, Vh=90, seed=11):
    """``H·Wᵀ + b`` exact in fp32 (multiples of 1/32 below 2¹⁷), as in test_lse_offset."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-4, 5, (N, D), generator=g).double() / 4
    w = torch.randint(-4, 5, (Vh, D), generator=g).double() / 8
    b = offset + torch.randint(-64, 65, (Vh,), generator=g).double() / 32
    return h.float(), w.float(), b.float()


LINEAR_CASES = [("torch", "chunked"), ("triton", "chunked"), ("triton", "fused")]


def linear_reference(h, w, b, y, g, c):
    h64, w64, b64 = (t.double().requires_grad_() for t in (h, w, b))
    logq = torch.log_softmax((h64 @ w64.t() + b64) * c, -1)
    ref = logq.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    p = logq.exp()
    ent = -(p * torch.where(torch.isfinite(logq), logq, torch.zeros_like(logq))).sum(-1)
    grads = torch.autograd.grad((g * (ref + 0.5 * ent)).sum(), (h64, w64, b64))
    return ref.detach(), ent.detach(), grads


@pytest.mark.parametrize("backend,impl", LINEAR_CASES)
@pytest.mark.parametrize("scale,temperature", [(1.0, 0.7), (1.0, 1e-3), (-1.0, 1.0), (-0.3, 0.7)])
def test_fused_linear_exact_at_any_scale_and_temperature(backend, impl, scale, temperature):
    """``impl="fused"`` rounded ``z = x·scale/T`` before subtracting the max (and its LSE pair
    lacked the max logit's rounding error): log-prob error 4.8e-4 at T = 0.7 and a bias of 1e4,
    0.75 at T = 1e-3, while the chunked paths were exact.  The kernels now reduce key differences
    ``(x − x_max)·scale/T`` as the token kernels do."""
    h, w, b = dyadic_head(1e4)
    y = torch.randint(0, w.shape[0], (h.shape[0],), generator=torch.Generator().manual_seed(12))
    g = torch.rand(h.shape[0], generator=torch.Generator().manual_seed(13), dtype=torch.float64) * 2 - 1
    ref, ent_ref, grads_ref = linear_reference(h, w, b, y, g, scale / temperature)
    hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
    out = pyfused_po.linear_token_logprobs(hh, ww, y, bias=bb, extras=("entropy",), logit_scale=scale,
                                           temperature=temperature, backend=backend, impl=impl)
    grads = torch.autograd.grad((g.float() * (out.logps + 0.5 * out.entropy)).sum(), (hh, ww, bb))
    assert max_err(out.logps, ref) <= TOL
    assert max_err(out.entropy.detach(), ent_ref) <= TOL
    for got, want in zip(grads, grads_ref):
        assert max_err(got, want) <= 1e-5 * want.abs().max().item() + GRAD_TOL


@pytest.mark.parametrize("backend,impl", LINEAR_CASES)
def test_fused_linear_entropy_gradient_with_a_minus_inf_bias(backend, impl):
    """A −inf bias masks ids (a padded head).  The fused backward formed p·(log p + H) =
    0·(−inf) there: NaN in every dH, dW, db entry.  Those ids now get 0, as on the logits path."""
    h, w, b = dyadic_head(0.0)
    b[60:] = -float("inf")
    y = torch.randint(0, 60, (h.shape[0],), generator=torch.Generator().manual_seed(14))
    g = torch.rand(h.shape[0], generator=torch.Generator().manual_seed(15), dtype=torch.float64) * 2 - 1
    ref, ent_ref, grads_ref = linear_reference(h, w, b, y, g, 1.0)
    hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
    out = pyfused_po.linear_token_logprobs(hh, ww, y, bias=bb, extras=("entropy",), backend=backend, impl=impl)
    grads = torch.autograd.grad((g.float() * (out.logps + 0.5 * out.entropy)).sum(), (hh, ww, bb))
    assert max_err(out.entropy.detach(), ent_ref) <= TOL
    for got, want in zip(grads, grads_ref):
        assert torch.isfinite(got).all()
        assert max_err(got, want) <= 1e-5 * want.abs().max().item() + GRAD_TOL
    assert (grads[2][60:] == 0).all()


# --- entropy of a row that is not a distribution ------------------------------------------------

@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("bad", ("nan", "+inf", "all -inf"))
def test_entropy_of_a_non_finite_row_is_not_finite(backend, bad):
    """docs/reliability.md: a NaN (or +inf) in a row makes that token's results non-finite,
    never a plausible number.  The torch backend's entropy masked ``p·log p`` with ``p > 0``,
    which is false for NaN: entropy 0.0 for a NaN, +inf or all −inf row (Triton: NaN)."""
    x = logits((2, 3, V), seed=16)
    if bad == "nan":
        x[0, 1, 7] = float("nan")
    elif bad == "+inf":
        x[0, 1, 7] = float("inf")
    else:
        x[0, 1] = -float("inf")
    y = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(17))
    xx = x.clone().requires_grad_()
    out = pyfused_po.token_logprobs(xx, y, extras=("entropy",), backend=backend)
    assert not torch.isfinite(out.entropy[0, 1])
    ok = torch.ones(2, 3, dtype=torch.bool)
    ok[0, 1] = False
    assert torch.isfinite(out.entropy[ok]).all()  # other tokens are unaffected
    (grad,) = torch.autograd.grad(out.entropy[ok].sum(), xx)
    assert torch.isfinite(grad[ok]).all()


@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("bad", ("nan", "all -inf"))
def test_token_kl_of_a_non_finite_reference_row_is_not_finite(backend, bad):
    """The same for ``token_kl``'s reference: the torch backend masked p_ref·(…) with
    ``p_ref > 0``, so a NaN (or all −inf) reference row gave KL = 0.0 (Triton: NaN)."""
    x = logits((2, 3, V), seed=18)
    r = logits((2, 3, V), seed=19)
    if bad == "nan":
        r[1, 0, 5] = float("nan")
    else:
        r[1, 0] = -float("inf")
    y = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(20))
    out = pyfused_po.token_kl(x, r, y, backend=backend)
    kl = out if torch.is_tensor(out) else out.kl
    assert not torch.isfinite(kl[1, 0])
    ok = torch.ones(2, 3, dtype=torch.bool)
    ok[1, 0] = False
    assert torch.isfinite(kl[ok]).all()


# --- held up (regression tests for what was tried) ------------------------------------------------

@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("loss_type,reduction", [("kto", "mean"), ("apo_zero_unpaired", "sum")])
def test_fused_kto_packed_with_empty_sequences_against_float64(backend, loss_type, reduction):
    """FusedKTOLoss's three-GEMM plan on a packed stream with two empty sequences, an ignored
    label, ``shift`` and a scaled upstream gradient (loss·0.5): loss and dH/dW/db equal float64
    math written from the KTO formula (z₀ = 0)."""
    g = torch.Generator().manual_seed(21)
    D, Vh, beta = 8, 37, 0.1
    cu = torch.tensor([0, 4, 4, 9, 9, 15])
    S = cu.numel() - 1
    h = torch.randn(1, 15, D, generator=g)
    w = torch.randn(Vh, D, generator=g) * 0.5
    b = torch.randn(Vh, generator=g) * 0.1
    y = torch.randint(0, Vh, (1, 15), generator=g)
    y[0, 6] = -100
    des = torch.tensor([True, False, True, True, False])
    ref = torch.randn(S, generator=g)

    h64, w64, b64 = (t.double().requires_grad_() for t in (h[0], w, b))
    logq = torch.log_softmax(h64 @ w64.t() + b64, -1)
    sums = []
    for s in range(S):
        terms = [logq[t, y[0, t + 1]] for t in range(int(cu[s]), int(cu[s + 1]) - 1) if y[0, t + 1] != -100]
        sums.append(torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float64))
    r = torch.stack(sums) - ref.double()
    if loss_type == "kto":
        losses = torch.where(des, 1 - torch.sigmoid(beta * r), 1 - torch.sigmoid(-beta * r))
    else:
        losses = torch.where(des, 1 - torch.sigmoid(beta * r), torch.sigmoid(beta * r))
    loss_ref = losses.mean() if reduction == "mean" else losses.sum()
    grads_ref = torch.autograd.grad(0.5 * loss_ref, (h64, w64, b64))

    hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
    module = pyfused_po.FusedKTOLoss(beta=beta, loss_type=loss_type, reduction=reduction, shift=True,
                                     backend=backend)
    out = module(hidden=hh, weight=ww, bias=bb, labels=y, is_desirable=des, ref_logps=ref, cu_seqlens=cu)
    (0.5 * out.loss).backward()
    assert abs(out.loss.item() - loss_ref.item()) <= 1e-6
    for got, want in zip((hh.grad[0], ww.grad, bb.grad), grads_ref):
        assert max_err(got, want) <= 1e-6 * want.abs().max().item() + 1e-8


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_vocab_parallel_with_a_slice_that_is_all_minus_inf(backend, monkeypatch):
    """One rank's slice is entirely −inf (its LSE pair is (−inf, 0)): the merge gives the
    unsharded log-probs, entropy, log Σp² and gradients, no NaN, at an offset of 1e4 and T = 0.5
    (a power of 2: at T = 0.7 the combine subtracts the rounded target logit z_y, the limit that
    docs/reliability.md names, 5.6e-4 here)."""
    from pyfused_po.distributed import vocab_parallel

    x = logits((2, 3, V), seed=22, offset=1e4)
    x[..., 100:] = -float("inf")
    y = torch.randint(0, 100, (2, 3), generator=torch.Generator().manual_seed(23))
    T = 0.5
    x64 = x.double().requires_grad_()
    logq = torch.log_softmax(x64 / T, -1)
    p = logq.exp()
    ref = logq.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    ent = -(p * torch.where(torch.isfinite(logq), logq, torch.zeros_like(logq))).sum(-1)
    lsq = torch.logsumexp(2 * logq, -1)
    (grad_ref,) = torch.autograd.grad((ref + ent + 0.3 * lsq).sum(), x64)

    bounds = (0, 53, 100, V)
    fake, slices = fake_ranks(monkeypatch, bounds)

    def forward(rank, v0, v1):
        fake.rank = rank
        shard = x[..., v0:v1].clone().requires_grad_()
        return shard, vocab_parallel.vocab_parallel_token_logprobs(
            shard, y, group=object(), vocab_start=v0, temperature=T, backend=backend,
            extras=("entropy", "log_sum_sq_probs"))

    for rank, (v0, v1) in slices:
        with pytest.raises(Recorded):
            forward(rank, v0, v1)
    grads = []
    for rank, (v0, v1) in slices:
        shard, out = forward(rank, v0, v1)
        assert max_err(out.logps, ref) <= TOL
        assert max_err(out.entropy.detach(), ent.detach()) <= TOL
        assert max_err(out.log_sum_sq_probs.detach(), lsq.detach()) <= TOL
        (grad,) = torch.autograd.grad((out.logps + out.entropy + 0.3 * out.log_sum_sq_probs).sum(), shard)
        grads.append(grad)
    grad = torch.cat(grads, -1)
    assert torch.isfinite(grad).all() and (grad[..., 100:] == 0).all()
    assert max_err(grad, grad_ref) <= GRAD_TOL / T
