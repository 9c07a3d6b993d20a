"""Fused-linear execution plans: vocabulary-outer / token-outer backward and the frozen-head
(two-GEMM) plan give the gradients of the plain float64 formula."""
import pytest
import torch
import torch.nn.functional as F

from pyfused_po import linear_token_logprobs
from pyfused_po.token.torch_backend import linear as chunked


def _reference(hidden, weight, bias, labels, *, shift=False, temperature=1.0, logit_scale=1.0, softcap=None):
    """Per-token log-prob, entropy, log Σ p², mean logit from materialized float64 logits."""
    x = hidden @ weight.t() + (0 if bias is None else bias)
    z = x * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    y = labels
    if shift:
        z, y = z[:, :-1], y[:, 1:]
    valid = y != -100
    logq = F.log_softmax(z, -1)
    p = logq.exp()
    lp = logq.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ent = -(p * logq).sum(-1)
    lsq = torch.logsumexp(2 * logq, -1)
    mean = z.mean(-1)
    zero = torch.zeros((), dtype=x.dtype)
    outs = [torch.where(valid, v, zero) for v in (lp, ent, lsq, mean)]
    if shift:
        outs = [torch.cat([torch.zeros_like(v[:, :1]), v], 1) for v in outs]
    return outs


def _inputs(B, T, V, D, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5).requires_grad_(True)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).requires_grad_(True) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = -100
    return hidden, weight, b, labels


def _grads(outs, upstream, params):
    loss = sum((o * u).sum() for o, u in zip(outs, upstream))
    return torch.autograd.grad(loss, [p for p in params if p is not None])


# (B, T, V, D, chunk_tokens): M < V with several vocabulary slices; M > V (token-outer).
SHAPES = [(2, 7, 600, 8, 5), (3, 13, 37, 6, 4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("transform", [dict(), dict(temperature=0.7, logit_scale=1.3, softcap=4.0)])
def test_backward_loop_orders_match_float64_formula(shape, transform):
    B, T, V, D, chunk = shape
    hidden, weight, bias, labels = _inputs(B, T, V, D, seed=V)
    out = linear_token_logprobs(hidden, weight, labels, bias=bias, backend="torch", chunk_tokens=chunk, shift=True,
                                extras=("entropy", "log_sum_sq_probs", "mean_logit"), **transform)
    ref = _reference(hidden, weight, bias, labels, shift=True, **transform)
    got = [out.logps, out.entropy, out.log_sum_sq_probs, out.mean_logit]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(B, T, generator=g, dtype=torch.float64) for _ in ref]
    for a, b in zip(_grads(got, upstream, (hidden, weight, bias)), _grads(ref, upstream, (hidden, weight, bias))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_vocab_outer_is_taken_when_tokens_are_fewer_than_the_vocabulary():
    # 5·600 elements per tile, M = 8 tokens: slices of 256 entries (a GEMM_TILE multiple).
    assert chunked.vocab_slice_width(8, 600, chunked.chunk_budget(600, torch.device("cpu"), 5)) == 256
    assert chunked.vocab_slice_width(8, 600, 1000) is None  # a 125-wide slice: token-outer
    assert chunked.chunk_size(10_000, 3000, torch.device("cpu")) % chunked.GEMM_TILE == 0


@pytest.mark.parametrize("shape", SHAPES)
def test_frozen_head_two_gemm_plan_matches_float64_formula(shape):
    B, T, V, D, chunk = shape
    hidden, weight, bias, labels = _inputs(B, T, V, D, seed=3 * V)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    out = linear_token_logprobs(hidden, weight, labels, bias=bias, backend="torch", chunk_tokens=chunk,
                                softcap=3.0, temperature=0.9, extras=("is_top1",))
    ref = _reference(hidden, weight, bias, labels, softcap=3.0, temperature=0.9)[0]
    torch.testing.assert_close(out.logps, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn(B, T, dtype=torch.float64)
    (got,) = torch.autograd.grad((out.logps * g).sum(), hidden)
    (want,) = torch.autograd.grad((ref * g).sum(), hidden)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("extra_in_loss", [True, False])
def test_frozen_head_with_extras_metric_only_or_in_the_loss(extra_in_loss):
    # Entropy only logged: the two-GEMM plan; entropy in the loss: the exact three-GEMM backward.
    hidden, weight, _, labels = _inputs(2, 6, 50, 4, seed=9, bias=False)
    weight.requires_grad_(False)
    out = linear_token_logprobs(hidden, weight, labels, backend="torch",
                                extras=("entropy", "mean_logit", "log_sum_sq_probs"))
    ref = _reference(hidden, weight, None, labels)
    c = 0.3 if extra_in_loss else 0.0
    loss = out.logps.sum() + (c * (out.entropy.sum() + out.mean_logit.sum() - out.log_sum_sq_probs.sum())
                              if extra_in_loss else 0.0)
    (got,) = torch.autograd.grad(loss, hidden)
    (want,) = torch.autograd.grad(ref[0].sum() + c * (ref[1].sum() + ref[3].sum() - ref[2].sum()), hidden)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_triton_fold_vocab_outer_matches_torch_backend():
    pytest.importorskip("triton")
    hidden, weight, bias, labels = _inputs(2, 5, 600, 8, seed=5)
    hidden, weight, bias = (t.float().detach().requires_grad_(True) for t in (hidden, weight, bias))
    grads = []
    for backend in ("torch", "triton"):
        out = linear_token_logprobs(hidden, weight, labels, bias=bias, backend=backend, chunk_tokens=4,
                                    extras=("mean_logit",))
        grads.append(torch.autograd.grad(out.logps.sum() + out.mean_logit.sum(), (hidden, weight, bias)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
