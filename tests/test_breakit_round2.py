"""Reliability, third round: inputs that gave silently wrong values or gradients in the code
that landed after issue 16 (fused-pairs, frozen head, vocabulary-outer backward, packed
layouts).  Each test compares against a float64 reference written from the formula
(``log_softmax`` on materialized logits) or expects a named refusal.  Tiny shapes."""
import pytest
import torch

from pyfused_po import linear_token_logprobs


def _logps_ref(hidden, weight, labels, *, bias=None, ignore_index=-100, shift=False):
    """float64 log p of ``labels`` under ``softmax(hidden·Wᵀ + b)``, 0 where ignored."""
    x = hidden.double() @ weight.double().t()
    if bias is not None:
        x = x + bias.double()
    if shift:
        x = torch.cat([torch.zeros_like(x[..., :1, :]), x[..., :-1, :]], dim=-2)
    valid = labels != ignore_index
    if shift:
        valid[..., 0] = False
    logq = torch.log_softmax(x, dim=-1)
    lp = logq.gather(-1, torch.where(valid, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, lp, torch.zeros_like(lp))


def _leaf(t, requires_grad=True):
    return t.detach().clone().requires_grad_(requires_grad)


# ------------------------------------------------------------------ vocabulary-outer backward

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("ignore_index", [0, 5, -100])
def test_vocab_outer_backward_with_a_nonnegative_ignore_index(backend, ignore_index):
    """With fewer labelled tokens than vocabulary entries the backward runs per vocabulary slice,
    labels relative to the slice.  The id ``v0 + ignore_index`` of the slice at ``v0`` became the
    relative label ``ignore_index`` and the fold dropped that token's gradient row for the slice."""
    if backend == "triton":
        pytest.importorskip("triton")
    dtype = torch.float64 if backend == "torch" else torch.float32
    g = torch.Generator().manual_seed(0)
    V, D = 600, 8  # chunk_tokens=3 with 5 tokens: slices of 256 ids, [0, 256), [256, 512), [512, 600)
    hidden = torch.randn(1, 5, D, generator=g, dtype=dtype)
    weight = torch.randn(V, D, generator=g, dtype=dtype)
    labels = torch.tensor([[256 + ignore_index % 256, 3, 512 + ignore_index % 88, 1, 300]])
    labels[0, 3] = ignore_index  # one ignored token too
    h, w = _leaf(hidden), _leaf(weight)
    lp = linear_token_logprobs(h, w, labels, ignore_index=ignore_index, backend=backend, chunk_tokens=3)
    coef = torch.randn(lp.shape, generator=g, dtype=torch.float64)
    (lp.double() * coef).sum().backward()
    hr, wr = _leaf(hidden.double()), _leaf(weight.double())
    ref = _logps_ref(hr, wr, labels, ignore_index=ignore_index)
    (ref * coef).sum().backward()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lp.double(), ref, **tol)
    torch.testing.assert_close(h.grad.double(), hr.grad, **tol)
    torch.testing.assert_close(w.grad.double(), wr.grad, **tol)
