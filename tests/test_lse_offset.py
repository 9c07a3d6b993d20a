"""Log-probs, KL, entropy and gradients stay exact when every logit of a row shares a large offset.

A one-value fp32 LSE ``m + log s`` rounds ``log s`` to the ulp of ``|m|`` (2e-3 at 3e4, 8e-3 at
1e5), and rounding base-2 logits ``u = z·log2 e`` before subtracting the max costs as much per
term.  The token stage now keeps the LSE as a ``(hi, lo)`` pair and takes every exponent
from a difference to the max (``kernels/lse_pair.py``), so the error is that of fp32 math on
numbers of size log V, whatever the offset.

Inputs are fp32 and every fp32 logit is exactly the value the float64 reference sees (for
the fused-linear path the products and the bias are dyadic, so ``H·Wᵀ + b`` is exact in fp32
at every offset).  References are float64 ``log_softmax`` / autograd of those values.

Tolerances: 4e-6 absolute on log-probs, KL and entropy (fp32 rounding of quantities of
size ≤ ~20 is ~1e-6; main's error was 3e-5 at offset 1e3, 5e-4 at 1e4), 2e-6 on logits
gradients and their row sums (entries are ``g·(onehot − p)`` with |g| ≤ 1), 1e-5 relative
on the fused-linear parameter gradients (fp32 GEMMs of D = 8).  Offset 0 is the control;
every larger offset fails on main's code.
"""
import pytest
import torch

import pyfused_po
from pyfused_po.distributed import vocab_parallel

from _fake_vocab_ranks import Recorded, fake_ranks

OFFSETS = (0.0, 1e3, 1e4, 3e4, 1e5)
BACKENDS = ("torch", "triton")
V = 150  # not a multiple of the interpreter's 128-wide block: body and masked edge
TOL = 4e-6
GRAD_TOL = 2e-6


def offset_logits(shape, offset, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset).float()


def upstream(shape, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1


def float64_reference(x, y, w):
    """``(log p(y), entropy, ∂Σ w·log p/∂x)`` from float64 log_softmax of the logits ``x``."""
    x64 = x.double().requires_grad_()
    logq = torch.log_softmax(x64, -1)
    ref = logq.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    ent_ref = -(logq.exp() * logq).sum(-1)
    (grad_ref,) = torch.autograd.grad((w * ref).sum(), x64)
    return ref.detach(), ent_ref.detach(), grad_ref


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_token_logprobs_and_entropy(backend, offset):
    x = offset_logits((2, 3, V), offset, seed=1)
    y = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(2))
    w = upstream((2, 3), seed=3)
    ref, ent_ref, grad_ref = float64_reference(x, y, w)

    xx = x.clone().requires_grad_()
    out = pyfused_po.token_logprobs(xx, y, extras=("entropy",), backend=backend)
    (grad,) = torch.autograd.grad((w.float() * out.logps).sum(), xx)
    assert max_err(out.logps, ref) <= TOL
    assert max_err(out.entropy.detach(), ent_ref.detach()) <= TOL
    assert max_err(grad, grad_ref) <= GRAD_TOL
    # Each row's gradient is g·(onehot − p): it sums to 0.
    assert grad.double().sum(-1).abs().max().item() <= GRAD_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_token_logprobs_shift_and_scale(backend, offset):
    """The same through ``shift`` and a temperature: z = x / 0.5 keeps the fp32 logits exact."""
    x = offset_logits((2, 4, V), offset / 2, seed=4)
    y = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(5))
    x64 = x.double().requires_grad_()
    ref = torch.log_softmax(x64[:, :-1] / 0.5, -1).gather(-1, y[:, 1:].unsqueeze(-1)).squeeze(-1)
    (grad_ref,) = torch.autograd.grad(ref.sum(), x64)
    xx = x.clone().requires_grad_()
    out = pyfused_po.token_logprobs(xx, y, shift=True, temperature=0.5, backend=backend)
    (grad,) = torch.autograd.grad(out.sum(), xx)
    assert max_err(out[:, 1:], ref) <= TOL
    assert max_err(grad, grad_ref) <= 2 * GRAD_TOL  # dz/dx = 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale,temperature", [(1.0, 0.7), (-1.0, 1.3)])
@pytest.mark.parametrize("offset", OFFSETS)
def test_exact_for_any_scale_and_temperature(backend, scale, temperature, offset):
    """z = x·scale/T is not representable in fp32 here: rounding z first costs ulp(|z|)/2 per
    logit.  Both backends reduce the exact x·scale/T minus its max (the max logit's own
    rounding error rides in the pair's lo for the backward)."""
    x = offset_logits((2, 3, V), offset, seed=17)
    y = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(18))
    x64 = x.double().requires_grad_()
    ref = torch.log_softmax(x64 * scale / temperature, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    (grad_ref,) = torch.autograd.grad(ref.sum(), x64)
    xx = x.clone().requires_grad_()
    out = pyfused_po.token_logprobs(xx, y, logit_scale=scale, temperature=temperature, backend=backend)
    (grad,) = torch.autograd.grad(out.sum(), xx)
    assert max_err(out, ref) <= TOL
    assert max_err(grad, grad_ref) <= GRAD_TOL / temperature
    assert grad.double().sum(-1).abs().max().item() <= GRAD_TOL / temperature


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_token_kl(backend, offset):
    x = offset_logits((2, 3, V), offset, seed=6)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    r = (x.double() + 0.5 * noise).float()  # the reference model: the same offset, other logits
    y = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(8))
    w_kl, w_lp = upstream((2, 3), seed=9), upstream((2, 3), seed=10)
    x64 = x.double().requires_grad_()
    lq = torch.log_softmax(x64, -1)
    lqr = torch.log_softmax(r.double(), -1)
    kl_ref = (lqr.exp() * (lqr - lq)).sum(-1)
    lp_ref = lq.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    (grad_ref,) = torch.autograd.grad((w_kl * kl_ref + w_lp * lp_ref).sum(), x64)

    xx = x.clone().requires_grad_()
    out = pyfused_po.token_kl(xx, r, y, backend=backend, with_logps=True)
    (grad,) = torch.autograd.grad((w_kl.float() * out.kl + w_lp.float() * out.logps).sum(), xx)
    assert max_err(out.kl, kl_ref) <= TOL
    assert max_err(out.logps, lp_ref) <= TOL
    assert max_err(grad, grad_ref) <= GRAD_TOL
    assert grad.double().sum(-1).abs().max().item() <= GRAD_TOL  # Σ_v (p − p_ref) = 0, Σ (onehot − p) = 0


def dyadic_head(offset, N=7, D=8, Vh=90, seed=11):
    """``hidden [N, D]``, ``weight [Vh, D]``, ``bias [Vh]`` whose fp32 logits ``H·Wᵀ + b`` are exact:
    multiples of 1/32 below 2¹⁷ (the fp32 ulp at 1e5 is 1/128)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-4, 5, (N, D), generator=g).double() / 4
    w = torch.randint(-4, 5, (Vh, D), generator=g).double() / 8
    b = offset + torch.randint(-64, 65, (Vh,), generator=g).double() / 32
    assert torch.equal(b.float().double(), b)
    return h.float(), w.float(), b.float()


LINEAR_CASES = [("torch", "chunked"), ("triton", "chunked"), ("triton", "fused")]


@pytest.mark.parametrize("backend,impl", LINEAR_CASES)
@pytest.mark.parametrize("offset", OFFSETS)
def test_linear_token_logprobs(backend, impl, offset):
    h, w, b = dyadic_head(offset)
    y = torch.randint(0, w.shape[0], (h.shape[0],), generator=torch.Generator().manual_seed(12))
    g = upstream((h.shape[0],), seed=13)
    h64, w64, b64 = (t.double().requires_grad_() for t in (h, w, b))
    logq = torch.log_softmax(h64 @ w64.t() + b64, -1)
    ref = logq.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    ent_ref = -(logq.exp() * logq).sum(-1)
    gh_ref, gw_ref, gb_ref = torch.autograd.grad((g * ref).sum(), (h64, w64, b64))

    hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
    out = pyfused_po.linear_token_logprobs(hh, ww, y, bias=bb, extras=("entropy",), backend=backend, impl=impl)
    gh, gw, gb = torch.autograd.grad((g.float() * out.logps).sum(), (hh, ww, bb))
    assert max_err(out.logps, ref) <= TOL
    assert max_err(out.entropy.detach(), ent_ref.detach()) <= TOL
    assert max_err(gb, gb_ref) <= GRAD_TOL * h.shape[0]  # Σ over tokens of g·(onehot − p)
    assert gb.double().sum().abs().item() <= GRAD_TOL * h.shape[0]  # every token's row sums to 0
    for got, want in ((gh, gh_ref), (gw, gw_ref)):
        assert max_err(got, want) <= 1e-5 * want.abs().max().item() + GRAD_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_vocab_parallel_combine(backend, offset, monkeypatch):
    """Slices 53 / 50 / 47 of one vocabulary: the combined log-probs, entropy and every slice's
    gradient equal the unsharded float64 values."""
    x = offset_logits((2, 3, V), offset, seed=14)
    # One slice's logits sit lower: its weight is small, the merge of pairs must not lose it.
    x[..., 103:] -= 3.0
    y = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(15))
    w = upstream((2, 3), seed=16)
    ref, ent_ref, grad_ref = float64_reference(x, y, w)

    bounds = (0, 53, 103, V)
    fake, slices = fake_ranks(monkeypatch, bounds)

    def forward(rank, v0, v1):
        fake.rank = rank
        shard = x[..., v0:v1].clone().requires_grad_()
        return shard, vocab_parallel.vocab_parallel_token_logprobs(
            shard, y, group=object(), vocab_start=v0, extras=("entropy",), backend=backend)

    for rank, (v0, v1) in slices:
        with pytest.raises(Recorded):
            forward(rank, v0, v1)
    grads, outs = [], []
    for rank, (v0, v1) in slices:
        shard, out = forward(rank, v0, v1)
        (grad,) = torch.autograd.grad((w.float() * out.logps).sum(), shard)
        grads.append(grad)
        outs.append(out)
    for out in outs:  # every rank gets the same full-vocabulary values
        assert max_err(out.logps, ref) <= TOL
        assert max_err(out.entropy.detach(), ent_ref.detach()) <= TOL
    grad = torch.cat(grads, -1)
    assert max_err(grad, grad_ref) <= GRAD_TOL
    assert grad.double().sum(-1).abs().max().item() <= GRAD_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_vocab_parallel_linear_combine(backend, offset, monkeypatch):
    """The fused-linear form with the LM head split 40 / 50 rows: log-probs, ``grad_hidden``
    (the sum of the ranks' terms, which ``reduce_grad_hidden`` would all-reduce) and each
    slice's weight and bias gradients equal the unsharded float64 values."""
    h, w, b = dyadic_head(offset, seed=19)
    y = torch.randint(0, w.shape[0], (1, h.shape[0]), generator=torch.Generator().manual_seed(20))
    g = upstream((1, h.shape[0]), seed=21)
    h64, w64, b64 = (t.double().requires_grad_() for t in (h, w, b))
    ref = torch.log_softmax(h64 @ w64.t() + b64, -1).gather(-1, y[0].unsqueeze(-1)).squeeze(-1)
    gh_ref, gw_ref, gb_ref = torch.autograd.grad((g[0] * ref).sum(), (h64, w64, b64))

    bounds = (0, 40, w.shape[0])
    fake, slices = fake_ranks(monkeypatch, bounds)

    def forward(rank, v0, v1):
        fake.rank = rank
        leaves = (h.clone().unsqueeze(0).requires_grad_(), w[v0:v1].clone().requires_grad_(),
                  b[v0:v1].clone().requires_grad_())
        out = vocab_parallel.vocab_parallel_linear_token_logprobs(
            leaves[0], leaves[1], y, group=object(), vocab_start=v0, bias_shard=leaves[2], backend=backend,
            reduce_grad_hidden=False)
        return leaves, out

    for rank, (v0, v1) in slices:
        with pytest.raises(Recorded):
            forward(rank, v0, v1)
    gh, gws, gbs = 0.0, [], []
    for rank, (v0, v1) in slices:
        leaves, out = forward(rank, v0, v1)
        assert max_err(out[0], ref) <= TOL
        d_h, d_w, d_b = torch.autograd.grad((g.float() * out).sum(), leaves)
        gh = gh + d_h[0].double()
        gws.append(d_w)
        gbs.append(d_b)
    gb, gw = torch.cat(gbs), torch.cat(gws)
    assert max_err(gb, gb_ref) <= GRAD_TOL * h.shape[0]
    assert gb.double().sum().abs().item() <= GRAD_TOL * h.shape[0]
    for got, want in ((gh, gh_ref), (gw, gw_ref)):
        assert max_err(got, want) <= 1e-5 * want.abs().max().item() + GRAD_TOL
